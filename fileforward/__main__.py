"""`python -m fileforward` is the `fileforward` command."""
from .cli import main

if __name__ == "__main__":
    main()
