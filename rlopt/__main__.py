from rlopt.train import main

main()
