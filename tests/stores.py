"""raylens ``Storage`` clients for the local test servers of :mod:`tests.servers`."""

from __future__ import annotations

from raylens.schema import StorageConfig
from raylens.storage import Storage

from tests.servers import GCSServer, S3Server


def s3_storage(server: S3Server) -> Storage:
    """A ``Storage`` that reaches ``s3://`` on the SeaweedFS ``server`` with its key pair."""
    return Storage(
        StorageConfig(
            s3_endpoint_url=server.endpoint_url,
            s3_region=server.region,
            s3_access_key_id=server.access_key,
            s3_secret_access_key=server.secret_key,
        )
    )


def gcs_storage(server: GCSServer) -> Storage:
    """A ``Storage`` that reaches ``gs://`` on the fake-gcs-server ``server`` (no auth)."""
    return Storage(StorageConfig(gcs_endpoint_url=server.endpoint_url, gcs_anonymous=True))
