"""`python -m pipeline.transfer` (`make transfer`): the transferability matrix (pipeline/transferability.py),
the same job as `python -m pipeline task=transfer`, composed from conf/transfer.yaml."""
from pipeline.__main__ import cli


def main() -> None:
    cli("transfer")


if __name__ == "__main__":
    main()
