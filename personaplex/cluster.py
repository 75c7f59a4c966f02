"""`python -m personaplex.cluster`: the command of the Ray Serve cluster (`personaplex.serve.cluster`).

`serve run personaplex.cluster:build_app` and serve.yaml files that name this path keep working
for one release (`build_app` is re-exported); the application's home is `personaplex.serve.cluster`.
"""

from personaplex.serve.cluster import build_app, main

__all__ = ["build_app", "main"]

if __name__ == "__main__":
    main()
