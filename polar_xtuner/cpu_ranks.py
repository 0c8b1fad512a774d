"""``python -m polar_xtuner.cpu_ranks --install|--uninstall``: the entry of polar_xtuner/train/cpu_ranks.py."""

if __name__ == "__main__":
    from polar_xtuner.cli.entry import cli, start_tool

    start_tool()
    from polar_xtuner.train.cpu_ranks import main

    cli(main)
