"""``python -m launch``: the same command line as the ``fedistill`` script."""

from launch.cli import app

if __name__ == "__main__":
    app(prog_name="fedistill")
