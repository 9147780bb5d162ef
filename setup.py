"""The one native piece: the enclave's own write-fault handler (src/constmig/enclave/_wtrack.c).

Everything else is in pyproject.toml. Where no C compiler is at hand the package still installs; the
Access Tracker's pre-copy then says that its write tracker was not built (constmig.enclave.dirty).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # no compiler: install without the handler, say so
            print(f"warning: constmig's write-fault handler was not built ({e})")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"warning: constmig's write-fault handler was not built ({e})")


setup(
    ext_modules=[Extension("constmig.enclave._wtrack", ["src/constmig/enclave/_wtrack.c"],
                           extra_compile_args=["-O2", "-Wall", "-Werror"])],
    cmdclass={"build_ext": OptionalBuildExt},
)
