"""``python -m fedistill``: the same command line as the ``fedistill`` script."""

from fedistill.cli import app

if __name__ == "__main__":
    app(prog_name="fedistill")
