from gptoss_cloud.main import main

main()
