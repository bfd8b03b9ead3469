"""``mailmoat demo``: mailmoat on embedded defaults in front of backends it starts.

The demo writes a real config file (``<data_dir>/mailmoat.toml``, the same
format ``mailmoat run -c`` reads), a self-signed certificate, and starts a
backend: a private Postfix instance under ``<data_dir>/postfix`` when Postfix
is installed, else the built-in sink (:mod:`mailmoat.demo.sink`) that stores
messages under ``<data_dir>/mail``.  It then prints the ports and how to try
them, and runs the node until Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Literal

import trio

from mailmoat.app import ListenError, Node, run_node
from mailmoat.config import ConfigErrors, load_config

from .certs import ensure_self_signed

DEMO_DOMAIN = "mailmoat.test"

_CONFIG = """\
# Written by `mailmoat demo`. Run it yourself with: mailmoat run -c {config}
[node]
name = "demo"
data_dir = "{data_dir}"
drain_timeout = 5

[tls]
cert = "{cert}"
key = "{key}"
min_version = "1.2"

[log]
events = "{events}"
{rules}
[admin]
listen = "127.0.0.1:{admin_port}"
token_file = "{token_file}"

[[listener]]
name = "smtp"
protocol = "smtp"
listen = "{host}:{smtp}"
tls = "starttls"
greet_delay = 1
backend = "mx"

[[listener]]
name = "submission"
protocol = "smtp"
listen = "{host}:{submission}"
tls = "starttls"
require_tls = true
backend = "submission"

[[listener]]
name = "smtps"
protocol = "smtp"
listen = "{host}:{smtps}"
tls = "implicit"
backend = "submission"

{imap}
[[listener]]
name = "webmail"
protocol = "http"
listen = "{host}:{https}"
tls = "implicit"
backend = "webmail"

[listener.login]
path = "/login"
user_field = "user"
password_field = "password"
success_status = [302]
success_location = "/mail/"
success_cookie = "webmail_session"

[[listener]]
name = "webmail-redirect"
protocol = "http"
listen = "{host}:{http}"
redirect_https = "https://{host}:{https}"

[[backend]]
name = "webmail"
address = "127.0.0.1:{webmail_port}"
client_identity = "forwarded"

[[backend]]
name = "mx"
address = "127.0.0.1:{mx_port}"
client_identity = "{identity}"

[[backend]]
name = "submission"
address = "127.0.0.1:{sub_port}"
client_identity = "{identity}"
"""


_IMAP = """
[[listener]]
name = "imap"
protocol = "imap"
listen = "{host}:{imap}"
tls = "starttls"
require_tls = true
backend = "dovecot"

[[listener]]
name = "imaps"
protocol = "imap"
listen = "{host}:{imaps}"
tls = "implicit"
backend = "dovecot"

[[backend]]
name = "dovecot"
address = "127.0.0.1:{dovecot_port}"
client_identity = "imap-id"
"""


def shipped_rules_dir() -> Path | None:
    """The rule sets shipped with mailmoat (``rules/`` of the source tree), if present."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "rules", here.parents[3] / "rules"):
        if candidate.is_dir() and any(candidate.glob("*.toml")):
            return candidate
    return None


def _imap_banner(node: Node) -> str:
    b = node.bound
    if "imap" not in b:
        return ""
    imap, imaps = b["imap"][0], b["imaps"][0]
    return f"""
  imap         {imap!s:<18} STARTTLS required       -> Dovecot (users alice, bob,
  imaps        {imaps!s:<18} implicit TLS               carol: password <user>pw)

Read it back over IMAP (mail sent above lands in Dovecot):
  curl -k --ssl-reqd imap://{imap.host}:{imap.port}/INBOX -u alice:alicepw
  curl -k "imaps://{imaps.host}:{imaps.port}/INBOX;UID=1" -u alice:alicepw
  openssl s_client -starttls imap -connect {imap.host}:{imap.port} -quiet
      (then type: a LOGIN alice alicepw)
"""


def _webmail_banner(node: Node) -> str:
    web, plain = node.bound["webmail"][0], node.bound["webmail-redirect"][0]
    return f"""
  webmail      {web!s:<18} HTTPS (ALPN http/1.1)  -> the demo login app (alice/alicepw)
  webmail-http {plain!s:<18} redirects to HTTPS

Log in to the webmail (a wrong password shows as auth.attempt, outcome failure):
  curl -k -i -d 'user=alice&password=alicepw' https://{web.host}:{web.port}/login
  curl -k -i -d 'user=alice&password=wrong' https://{web.host}:{web.port}/login
"""


def _banner(node: Node, data_dir: Path, backend_desc: str, mail_dir: str) -> str:
    b = node.bound
    rules = node.rules.current
    rules_desc = (
        f"{len(rules.rules)} rules from {', '.join(str(p) for p in node.config.rules.paths)}"
        " (watched: edit a file and it reloads)"
        if node.config.rules.paths
        else "none (the shipped rule sets were not found)"
    )
    admin = (
        "-" if node.admin_address is None else f"{node.admin_address[0]}:{node.admin_address[1]}"
    )
    # with Dovecot, Postfix's submission port wants SMTP AUTH (checked by Dovecot)
    auth = " --auth-user bob --auth-password bobpw" if "imap" in b else ""
    smtp, sub, smtps = (str(b[n][0]) for n in ("smtp", "submission", "smtps"))
    sp, subp, smtpsp = (b[n][0].port for n in ("smtp", "submission", "smtps"))
    host = b["smtp"][0].host
    return f"""
mailmoat demo is running (node "demo", files in {data_dir})

  listener     address            TLS
  smtp         {smtp:<18} STARTTLS offered        -> {backend_desc}
  submission   {sub:<18} STARTTLS required
  smtps        {smtps:<18} implicit TLS

Try it:
  swaks --server {host}:{sp} --to alice@{DEMO_DOMAIN}
  swaks --server {host}:{subp} -tls{auth} --to bob@{DEMO_DOMAIN}
  swaks --server {host}:{smtpsp} --tls-on-connect{auth} --to carol@{DEMO_DOMAIN}
  python3 -c "import smtplib; s = smtplib.SMTP('{host}', {sp}); s.starttls(); \\
s.sendmail('me@example.org', ['alice@{DEMO_DOMAIN}'], 'Subject: hi\\r\\n\\r\\nhello'); s.quit()"
  openssl s_client -connect {host}:{smtpsp} -quiet      (then type EHLO me)
{_imap_banner(node)}{_webmail_banner(node)}
Delivered mail:  {mail_dir}
Config:          {data_dir / "mailmoat.toml"}  (mailmoat run -c that file does the same)
Rules:           {rules_desc}
Review page:     http://{admin}/  (blocked sessions, unban, allow-list; the token is in
                 {data_dir / "admin.token"})
Admin API:       http://{admin}/api/rules  (token in {data_dir / "admin.token"};
                 `mailmoat reload -c {data_dir / "mailmoat.toml"}` reloads rules)
Events (JSON lines, one per session open/TLS/close) follow on stdout.
Stop with Ctrl-C.
"""


def run_demo(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port_base: int = 10000,
    backend: Literal["auto", "postfix", "sink"] = "auto",
) -> int:
    from .dovecot import DovecotError, DovecotInstance, DovecotPorts, dovecot_available
    from .postfix import (
        LmtpPostfixInstance,
        PostfixError,
        PostfixInstance,
        PostfixPorts,
        find_free_port,
        postfix_available,
    )

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    cert, key = ensure_self_signed(data_dir / "tls")
    use_postfix = backend == "postfix" or (backend == "auto" and postfix_available())
    if backend == "postfix" and not postfix_available():
        print("mailmoat demo: Postfix is not installed (apt-get install postfix)", file=sys.stderr)
        return 1
    postfix: PostfixInstance | None = None
    dovecot: DovecotInstance | None = None
    if use_postfix and dovecot_available():
        # Dovecot stores the mail (LMTP from Postfix), checks SMTP AUTH for
        # Postfix and serves IMAP behind mailmoat
        droot = Path(tempfile.mkdtemp(prefix="mailmoat-demo-dovecot-"))
        dovecot = DovecotInstance(droot, DovecotPorts(imap=find_free_port()), domain=DEMO_DOMAIN)
        try:
            dovecot.start()
        except DovecotError as exc:
            print(f"mailmoat demo: could not start Dovecot ({exc}); IMAP left out", file=sys.stderr)
            shutil.rmtree(droot, ignore_errors=True)
            dovecot = None
    if use_postfix:
        ports = PostfixPorts(smtp=find_free_port(), submission=find_free_port())
        # Postfix's daemons (users postfix, nobody) must reach its directory;
        # data_dir may sit under a 0700 home, so the instance lives in /tmp.
        root = Path(tempfile.mkdtemp(prefix="mailmoat-demo-postfix-"))
        if dovecot is not None:
            postfix = LmtpPostfixInstance(
                root,
                ports,
                lmtp_path=dovecot.lmtp_socket_path,
                domain=DEMO_DOMAIN,
                users=tuple(dovecot.users),
                cert_file=cert,
                key_file=key,
                sasl_path=str(dovecot.auth_socket_path),
            )
        else:
            postfix = PostfixInstance(root, ports, domain=DEMO_DOMAIN, cert_file=cert, key_file=key)
        try:
            postfix.start()
        except PostfixError as exc:
            print(f"mailmoat demo: could not start Postfix: {exc}", file=sys.stderr)
            if dovecot is not None:
                dovecot.stop()
            return 1
        mx_port, sub_port = ports.smtp, ports.submission or ports.smtp
        backend_desc = f"Postfix 127.0.0.1:{mx_port} (submission {sub_port})"
        store = dovecot.maildir("alice").parent.parent if dovecot is not None else None
        mail_dir = (
            f"{store}/<user>/Maildir/  (Dovecot; removed when the demo stops)"
            if store is not None
            else str(postfix.maildir("alice").parent) + "/<user>/  (removed when the demo stops)"
        )
    else:
        mx_port = sub_port = find_free_port()
        backend_desc = f"built-in sink 127.0.0.1:{mx_port}"
        mail_dir = str(data_dir / "mail") + "/"
    webmail_port = find_free_port()
    config_path = data_dir / "mailmoat.toml"
    token_file = data_dir / "admin.token"
    if not token_file.is_file():
        token_file.write_text(secrets.token_hex(32) + "\n", encoding="utf-8")
        token_file.chmod(0o600)
    rules_dir = shipped_rules_dir()
    rules = f'\n[rules]\npaths = ["{rules_dir}"]\nwatch = true\n' if rules_dir else ""
    config_path.write_text(
        _CONFIG.format(
            config=config_path,
            data_dir=data_dir,
            cert=cert,
            key=key,
            events="stdout",
            rules=rules,
            admin_port=port_base + 99,
            token_file=token_file,
            host=host,
            smtp=port_base + 25,
            submission=port_base + 587,
            smtps=port_base + 465,
            mx_port=mx_port,
            sub_port=sub_port,
            https=port_base + 443,
            http=port_base + 80,
            webmail_port=webmail_port,
            # the private Postfix trusts XCLIENT from loopback; the sink speaks no XCLIENT
            identity="xclient" if postfix is not None else "none",
            imap=""
            if dovecot is None
            else _IMAP.format(
                host=host,
                imap=port_base + 143,
                imaps=port_base + 993,
                dovecot_port=dovecot.ports.imap,
            ),
        ),
        encoding="utf-8",
    )
    try:
        config = load_config(config_path)
    except ConfigErrors as exc:  # pragma: no cover - the template is tested
        print(f"mailmoat demo: {exc}", file=sys.stderr)
        return 1

    failure: list[ListenError] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            from .webapp import serve_webapp

            await nursery.start(serve_webapp, "127.0.0.1", webmail_port)
            if postfix is None:
                from .sink import serve_sink

                port = await nursery.start(serve_sink, data_dir / "mail", "127.0.0.1", mx_port)
                assert port == mx_port

            def ready(node: Node) -> None:
                print(_banner(node, data_dir, backend_desc, mail_dir), flush=True)

            try:
                await run_node(config, on_ready=ready)
            except ListenError as exc:
                failure.append(exc)
            finally:
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        if postfix is not None:
            postfix.stop()
            shutil.rmtree(postfix.root, ignore_errors=True)
        if dovecot is not None:
            dovecot.stop()
            shutil.rmtree(dovecot.root, ignore_errors=True)
    if failure:
        print(f"mailmoat demo: {failure[0]} (use --port-base to move the demo)", file=sys.stderr)
        return 1
    return 0
