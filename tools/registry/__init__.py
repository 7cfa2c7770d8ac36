"""The registry client: pull, push and login over the distribution API (OCI distribution spec,
Docker registry HTTP API v2).

``reference`` docker's reference rules; ``auth`` credentials files, challenges and tokens;
``client`` one registry over HTTP(S) (TLS, retries, range-resumed blob streams); ``pull`` and
``push`` the verbs, on the importer's and exporter's own paths.
"""
