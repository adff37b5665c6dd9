"""A small OSS-to-S3 translating proxy, so oss2 can talk to a local S3 server.

No local server speaks OSS, but OSS's object and multipart API is S3's with
other headers. This proxy, on 127.0.0.1, lets oss2 (path-style URLs, as it
uses for IP endpoints) talk to moto:

* requests: checks the ``OSS`` authorisation (V1: the HMAC-SHA1 signature is
  verified; V4: the access key id is checked) and answers 403
  ``InvalidAccessKeyId`` / ``SignatureDoesNotMatch`` like OSS; renames
  ``x-oss-meta-*`` to ``x-amz-meta-*``; de-chunks bodies; re-signs for S3
  with SigV4;
* responses: strips the S3 XML namespace, writes timestamps the way OSS does
  (``.000Z``, which oss2 insists on), renames metadata back, adds
  ``x-oss-request-id`` and ``x-oss-hash-crc64ecma`` (CRC-64/XZ of the body
  sent for PUT and UploadPart, of the whole stored object for HEAD, GET and
  CompleteMultipartUpload).

Every request is logged (``proxy.log``) so tests can count UploadPart calls.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import re
import uuid
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qsl, unquote, urlsplit

import crcmod

from .local_proxy import LocalProxy

# CRC-64/XZ (ECMA-182 polynomial, reflected, all-ones init/xor-out): the check
# value of b"123456789" is 0x995DC9BBDF1939FA.
crc64 = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, xorOut=0xFFFFFFFFFFFFFFFF, rev=True)

_SUBRESOURCES = {"uploads", "uploadId", "partNumber", "acl", "bucketInfo", "sequential", "objectMeta", "tagging"}


def _error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>{uuid.uuid4().hex}</RequestId><HostId>127.0.0.1</HostId></Error>"
    ).encode()


class OSSProxy(LocalProxy):
    """Serve on 127.0.0.1 (a free port) in front of the S3 server at ``backend`` (host:port)."""

    thread_name = "oss-proxy"

    def __init__(self, backend: str, keys: dict[str, str]) -> None:
        self.keys = dict(keys)
        #: Bodies of the next N UploadPart/PutObject requests get one byte flipped on arrival (fault tests).
        self.flip_next = 0
        super().__init__(backend)

    # -- one request -----------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        try:
            body = self._read_body(h)
        except ConnectionError:
            h.close_connection = True
            return
        op = _operation(h.command, query)
        if op in ("UploadPart", "PutObject") and body:
            with self._lock:
                flip, self.flip_next = self.flip_next > 0, max(0, self.flip_next - 1)
            if flip:  # a byte damaged on the way (the server receives and stores it so)
                body = body[:100] + bytes([body[100] ^ 1]) + body[101:]
        with self._lock:
            self.log.append({"method": h.command, "path": unquote(url.path), "op": op, "part": query.get("partNumber")})
        denied = self._check_auth(h, unquote(url.path), query)
        if denied:
            self._reply(h, 403, {"Content-Type": "application/xml"}, _error(*denied))
            return
        headers = {"Content-Length": str(len(body))}
        for k, v in h.headers.items():
            lk = k.lower()
            if lk.startswith("x-oss-meta-"):
                headers["x-amz-meta-" + lk[len("x-oss-meta-") :]] = v
            elif lk in ("content-md5", "content-type"):
                headers[k] = v
        status, rheaders, rbody = self._forward(h.command, url.path, url.query, headers, body)
        out = {"x-oss-request-id": uuid.uuid4().hex.upper()}
        for k, v in rheaders:
            lk = k.lower()
            if lk.startswith("x-amz-meta-"):
                out["x-oss-meta-" + lk[len("x-amz-meta-") :]] = v
            elif lk in ("etag", "content-type", "last-modified"):
                out[k] = v
            elif lk == "content-length" and h.command == "HEAD":
                out["Content-Length"] = v
        if 200 <= status < 300:
            if op in ("PutObject", "UploadPart"):
                out["x-oss-hash-crc64ecma"] = str(crc64(body))
            elif op in ("GetObject", "HeadObject", "CompleteMultipartUpload"):
                whole = rbody if op == "GetObject" else self._forward("GET", url.path, "", {}, b"")[2]
                out["x-oss-hash-crc64ecma"] = str(crc64(whole))
        if rbody and rheaders and any(k.lower() == "content-type" and "xml" in v for k, v in rheaders):
            text = rbody.decode("utf-8")
            text = re.sub(r'\sxmlns="[^"]*"', "", text)
            text = re.sub(r"(T\d\d:\d\d:\d\d)\.\d+Z", r"\1.000Z", text)
            text = re.sub(r"(T\d\d:\d\d:\d\d)Z<", r"\1.000Z<", text)
            if "<ListBucketResult" in text:  # OSS names each listed object's type (ListObjects)
                text = text.replace("</Contents>", "<Type>Normal</Type></Contents>")
            rbody = text.encode("utf-8")
        if h.command != "HEAD":
            out["Content-Length"] = str(len(rbody))
        self._reply(h, status, out, b"" if h.command == "HEAD" else rbody)

    @staticmethod
    def _read_body(h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        data = h.rfile.read(n) if n else b""
        if len(data) < n:  # the client went away mid-body: like a real server, store nothing
            raise ConnectionAbortedError(f"request body cut at {len(data)} of {n} bytes")
        return data

    def _check_auth(self, h: BaseHTTPRequestHandler, path: str, query: dict[str, str]) -> tuple[str, str] | None:
        auth = h.headers.get("Authorization", "")
        m1 = re.match(r"^OSS ([^:]+):(.+)$", auth)
        m4 = re.match(r"^OSS4-HMAC-SHA256 Credential=([^/]+)/", auth)
        key_id = (m1 or m4).group(1) if (m1 or m4) else None
        if key_id is None or key_id not in self.keys:
            return "InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist in our records."
        if m1:
            canon = sorted((k.lower(), v) for k, v in h.headers.items() if k.lower().startswith("x-oss-"))
            sub = sorted((k, v) for k, v in query.items() if k in _SUBRESOURCES)
            resource = path + ("?" + "&".join(f"{k}={v}" if v else k for k, v in sub) if sub else "")
            to_sign = "\n".join(
                [
                    h.command,
                    h.headers.get("Content-MD5", ""),
                    h.headers.get("Content-Type", ""),
                    h.headers.get("x-oss-date", "") or h.headers.get("Date", ""),
                    "".join(f"{k}:{v}\n" for k, v in canon) + resource,
                ]
            )
            want = base64.b64encode(
                hmac.new(self.keys[key_id].encode(), to_sign.encode(), hashlib.sha1).digest()
            ).decode()
            if not hmac.compare_digest(want, m1.group(2)):
                return (
                    "SignatureDoesNotMatch",
                    "The request signature we calculated does not match the signature you provided.",
                )
        return None

    def _forward(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        url = f"http://{self.backend}{path}" + (f"?{query}" if query else "")
        req = AWSRequest(
            method=method, url=url, data=body, headers={**headers, "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}
        )
        S3SigV4Auth(Credentials("proxy", "proxy"), "s3", "us-east-1").add_auth(req)
        conn = http.client.HTTPConnection(self.backend, timeout=60)
        try:
            conn.request(
                method, path + (f"?{query}" if query else ""), body=body or None, headers=dict(req.headers.items())
            )
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        if "Content-Length" not in headers and h.command != "HEAD":
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if body and h.command != "HEAD":
            h.wfile.write(body)


def _operation(method: str, query: dict[str, str]) -> str:
    if "uploadId" in query:
        if method == "PUT" and "partNumber" in query:
            return "UploadPart"
        return {"POST": "CompleteMultipartUpload", "DELETE": "AbortMultipartUpload", "GET": "ListParts"}.get(
            method, "?"
        )
    if "uploads" in query:
        return "InitiateMultipartUpload" if method == "POST" else "ListMultipartUploads"
    return {"PUT": "PutObject", "GET": "GetObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(method, method)
