from constmig.cli import main

main()
