"""Everything that measures: the demo, the benchmarks (sizes, suite, load, soak), the client drivers
that call through a migration, the reports and plots. Nothing in the product imports this package."""
