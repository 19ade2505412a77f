"""A real S3-protocol server for the tests and the storage benchmark: moto's standalone server on 127.0.0.1,
reached through s3fs with an endpoint URL and throwaway credentials, the client path users take to AWS S3,
MinIO or Ceph.

With ``auth=True`` the server checks signatures (moto's IAM auth, on after the 3 unauthenticated calls that
create a user, its allow-all policy and its access key), so wrong credentials fail as they do on AWS.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

BUCKET = "vaejob-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """``start()`` / ``stop()`` a moto server; ``env`` is what a client process needs to reach it."""

    def __init__(self, auth: bool = True, bucket: str = BUCKET) -> None:
        self.auth, self.bucket = auth, bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.key_id, self.secret = "vaejob-test-key", "vaejob-test-secret"

    def start(self) -> S3Server:
        import moto  # noqa: F401  (the dev extra; ImportError tells the caller to skip)

        env = dict(os.environ)
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto server did not start on port {self.port}") from None
                time.sleep(0.1)
        if self.auth:
            self._make_user()
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def _make_user(self) -> None:
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="vaejob")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="vaejob", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="vaejob")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
        )

    def env(self, **extra: str) -> dict[str, str]:
        """The variables users set for MinIO / Ceph: endpoint, keys, region; no shared AWS config files."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
            **extra,
        }

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``prefix`` (relative name -> bytes)."""
        s3, out = self.client(), {}
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix.rstrip("/") + "/"
        ):
            for o in page.get("Contents", []):
                name = o["Key"][len(prefix.rstrip("/")) + 1 :]
                out[name] = s3.get_object(Bucket=self.bucket, Key=o["Key"])["Body"].read()
        return out

    def upload_dir(self, local: str, prefix: str) -> None:
        s3 = self.client()
        for name in sorted(os.listdir(local)):
            path = os.path.join(local, name)
            if os.path.isfile(path):
                s3.upload_file(path, self.bucket, f"{prefix.rstrip('/')}/{name}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
