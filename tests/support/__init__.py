"""Helpers shared by the test modules (fixtures live in tests/conftest.py, helpers here).

- ``environment``: the repository root, settings from the environment, polling with a hang guard;
- ``services``: the local PostgreSQL and Redis (fresh databases, flushed db numbers);
- ``backends``: a backend = database + broker + storage + model repository, as environment variables;
- ``processes``: real worker, API and beat processes;
- ``records``: jobs and API keys written straight into a backend's database;
- ``images``, ``archives``, ``scanners``: generated scans, zip/tar archives, DICOM/NIfTI files;
- ``models``: small real SavedModels (and one that refuses a kind of scan);
- ``training``: generated class folders for the training-side tests;
- ``api``: the app over a real database and Redis, in process;
- ``faults``: a restartable Redis, a cuttable TCP proxy, a whole private stack.
"""
