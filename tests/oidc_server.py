"""A loopback OpenID Connect provider standing in for huggingface.co's, so that Gradio's real OAuth routes
(`/login/huggingface`, `/login/callback`) run end to end in the tests. Test code only.

Who signs in is decided per browser: the provider reads a `user` cookie on its own origin (each browser context
sets its own), approves at once, and issues the access token `hf_oauth_<user>` with an RS256-signed ID token whose
claims are the profile Gradio shows (`preferred_username`, `name`, ...).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlparse

from joserfc import jwt
from joserfc.jwk import RSAKey

CLIENT_ID, CLIENT_SECRET = "hfcompress-test-client", "hfcompress-test-secret"


class ProviderState:
    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "test-key"})
        self.codes: dict[str, dict] = {}     # authorization code -> {user, nonce}
        self.logins: list[str] = []          # users who signed in, in order
        self.issuer = ""


class Handler(BaseHTTPRequestHandler):
    state: ProviderState

    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        issuer = self.state.issuer
        if url.path == "/.well-known/openid-configuration":
            return self._json(200, {"issuer": issuer, "authorization_endpoint": f"{issuer}/oauth/authorize",
                                    "token_endpoint": f"{issuer}/oauth/token", "jwks_uri": f"{issuer}/oauth/jwks",
                                    "userinfo_endpoint": f"{issuer}/oauth/userinfo", "response_types_supported":
                                    ["code"], "id_token_signing_alg_values_supported": ["RS256"],
                                    "subject_types_supported": ["public"]})
        if url.path == "/oauth/jwks":
            return self._json(200, {"keys": [self.state.key.as_dict(private=False)]})
        if url.path == "/oauth/authorize":
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
            if query.get("client_id") != CLIENT_ID or "user" not in cookie:
                return self._json(400, {"error": "invalid_request"})
            code = uuid.uuid4().hex
            self.state.codes[code] = {"user": cookie["user"].value, "nonce": query.get("nonce")}
            self.send_response(302)
            self.send_header("Location", query["redirect_uri"] + ("&" if "?" in query["redirect_uri"] else "?")
                             + urlencode({"code": code, "state": query.get("state", "")}))
            self.end_headers()
            return None
        return self._json(404, {"error": "not_found"})

    def do_POST(self) -> None:
        if urlparse(self.path).path != "/oauth/token":
            return self._json(404, {"error": "not_found"})
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode()).items()}
        grant = self.state.codes.pop(form.get("code", ""), None)
        if grant is None:
            return self._json(400, {"error": "invalid_grant"})
        user, now = grant["user"], int(time.time())
        self.state.logins.append(user)
        claims = {"iss": self.state.issuer, "sub": f"id-{user}", "aud": CLIENT_ID, "iat": now, "exp": now + 3600,
                  "nonce": grant["nonce"], "name": user.title(), "preferred_username": user,
                  "profile": f"https://huggingface.co/{user}", "picture": "", "website": ""}
        id_token = jwt.encode({"alg": "RS256", "kid": "test-key"}, claims, self.state.key)
        return self._json(200, {"access_token": f"hf_oauth_{user}", "token_type": "bearer", "expires_in": 3600,
                                "scope": "openid profile read-repos write-repos manage-repos",
                                "id_token": id_token})


def start() -> tuple[ThreadingHTTPServer, ProviderState]:
    """Start the provider on a free loopback port; its URL is `state.issuer`."""
    state = ProviderState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("BoundHandler", (Handler,), {"state": state}))
    state.issuer = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state
