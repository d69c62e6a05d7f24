import phd_flow

phd_flow.run_main("my_project")
