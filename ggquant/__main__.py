from ggquant.cli import main

main()
