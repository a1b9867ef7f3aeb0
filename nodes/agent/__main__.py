from nodes.agent.cli import main

main(prog_name="shedshare-agent")
