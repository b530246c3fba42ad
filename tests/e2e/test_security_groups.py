"""Security groups resolved live through the EC2 API (SPEC 2 `[security_groups]
aws`, 3.8), end to end: the real moat binary against a real EC2 emulator
(moto's server, `moto_server`) and, where moto falls short, a small EC2 query
endpoint written here.

moto accepts loopback private addresses (a VPC 127.0.0.0/16, a subnet
127.0.N.0/24, an interface with PrivateIpAddress 127.0.N.5), so admission is
tested for real: connections come from 127.0.N.x through moat to an echo
upstream. Each test works in its own security groups and its own subnet
(third octet N) of the shared emulator, so tests do not see each other's
interfaces.

moto does not paginate DescribeNetworkInterfaces (it ignores MaxResults and
never returns a NextToken: moto/ec2/responses/elastic_network_interfaces.py),
so pagination is tested against `PagingEc2`, a threaded http.server that
answers DescribeNetworkInterfaces in the real EC2 XML format, a few
interfaces a page, honouring NextToken. It also checks each request's SigV4
signature against botocore's, and sees which credentials signed it (the
role of `accounts`, assumed through moto's STS).

Timing: `refresh = "5s"` (the minimum moat allows); every wait polls with a
deadline of a few refreshes (CONVERGE), nothing sleeps to synchronise.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from _proxylib import closed_by_peer, echo_conn, is_refused, quiet_ports, refusal_outcome, server
from moatlib import REPO, assert_echoes, line_of, recv_exactly, run_moat, stays_false, wait_until

ACCOUNT = "123456789012"  # moto's default account id; moat picks credentials by account
REGION = "us-east-1"
REFRESH = "5s"  # the shortest refresh moat accepts
CONVERGE = 20.0  # a few refreshes, with room for a busy 2-core machine

MEMBERS = "moat_security_group_members"
REFRESHES = "moat_security_group_refreshes_total"
REVOKED = "moat_revoked_connections_total"




@pytest.fixture
def aws_env(tmp_path) -> dict[str, str]:
    """Environment for moat: static test credentials from the environment, no
    instance metadata, and empty config/credentials files so that no profile
    of this host is read."""
    d = tmp_path / "aws"
    d.mkdir()
    (d / "config").write_text("")
    (d / "credentials").write_text("")
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(d / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(d / "credentials"),
        "AWS_PROFILE": "default",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


# --------------------------------------------------------------------------
# moto's server
# --------------------------------------------------------------------------


def _moto_command(port: int) -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        exe = REPO / ".venv" / "bin" / "moto_server"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    return head + ["-H", "127.0.0.1", "-p", str(port)]


def _answers(url: str) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(url + "/moto-api/", timeout=1) as r:
            r.read()
        return True
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False


class MotoServer:
    """`moto_server -H 127.0.0.1 -p PORT` as a child process."""

    def __init__(self, log_path: Path):
        pytest.importorskip("moto", reason="moto[server] is not installed (tests/requirements.txt)")
        pytest.importorskip("boto3")
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        for _attempt in range(3):  # the chosen port could be taken before moto binds it
            self.port = quiet_ports(1)[0]
            self.url = f"http://127.0.0.1:{self.port}"
            self._log = open(log_path, "ab")
            env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
            self.proc = subprocess.Popen(_moto_command(self.port), stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=self._log, env=env,
                                         start_new_session=True)
            try:
                wait_until(lambda: self.proc.poll() is not None or _answers(self.url), 60,
                           interval=0.1, what="moto_server to answer")
            except TimeoutError:
                self.stop()
                raise
            if self.proc.poll() is None:
                return
            self._log.close()
        raise RuntimeError(f"moto_server did not start; log:\n{log_path.read_text(errors='replace')[-3000:]}")

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("ec2", endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                          connect_timeout=5, read_timeout=30, proxies={}))

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if not self._log.closed:
            self._log.close()


@pytest.fixture(scope="session")
def moto_session(tmp_path_factory):
    """One moto server for the whole session (each test uses its own groups)."""
    m = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    yield m
    m.stop()


@pytest.fixture
def moto_fn(tmp_path):
    """A moto server of this test alone (to be killed by it)."""
    m = MotoServer(tmp_path / "moto.log")
    yield m
    m.stop()


_octets = itertools.count(10)


class Ec2World:
    """A VPC with a subnet 127.0.N.0/24 of its own in a moto server: security
    groups and network interfaces with chosen loopback addresses."""

    def __init__(self, moto: MotoServer):
        self.moto = moto
        self.ec2 = moto.client()
        self.n = next(_octets)
        assert self.n < 250, "out of subnets"
        vpcs = self.ec2.describe_vpcs(Filters=[{"Name": "cidr", "Values": ["127.0.0.0/16"]}])["Vpcs"]
        vpc = vpcs[0] if vpcs else self.ec2.create_vpc(CidrBlock="127.0.0.0/16")["Vpc"]
        self.vpc_id = vpc["VpcId"]
        self.subnet_id = self.ec2.create_subnet(VpcId=self.vpc_id, CidrBlock=f"127.0.{self.n}.0/24")["Subnet"]["SubnetId"]

    def ip(self, host: int) -> str:
        return f"127.0.{self.n}.{host}"

    def group(self, name: str) -> str:
        sg = self.ec2.create_security_group(GroupName=f"{name}-{self.n}", Description=name, VpcId=self.vpc_id)
        return sg["GroupId"]

    def eni(self, ip: str, *groups: str) -> str:
        ni = self.ec2.create_network_interface(SubnetId=self.subnet_id, PrivateIpAddress=ip, Groups=list(groups))
        return ni["NetworkInterface"]["NetworkInterfaceId"]

    def delete(self, eni_id: str):
        self.ec2.delete_network_interface(NetworkInterfaceId=eni_id)

    def add_ip(self, eni_id: str, ip: str):
        self.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, PrivateIpAddresses=[ip])

    def addresses(self, group: str) -> set[str]:
        """What the emulator answers for the group (sanity check of the setup)."""
        out = set()
        for ni in self.ec2.describe_network_interfaces(
                Filters=[{"Name": "group-id", "Values": [group]}])["NetworkInterfaces"]:
            out.add(ni["PrivateIpAddress"])
            out.update(a["PrivateIpAddress"] for a in ni.get("PrivateIpAddresses", []))
        return out


@pytest.fixture
def world(moto_session) -> Ec2World:
    return Ec2World(moto_session)


# --------------------------------------------------------------------------
# Config and metrics helpers
# --------------------------------------------------------------------------


def config(admin: int, port: int, upstream: str, endpoint: str, groups: list[str], *,
           file: str | None = None, server_extra: str = "", role_arn: str | None = None) -> str:
    sg = "[security_groups]\n"
    if file:
        sg += f'file = "{file}"\n'
    accounts = f', accounts = {{ "{ACCOUNT}" = {{ role_arn = "{role_arn}" }} }}' if role_arn else ""
    sg += f'aws = {{ region = "{REGION}", refresh = "{REFRESH}", endpoint = "{endpoint}"{accounts} }}\n\n'
    rules = "".join(f'[[deployment.allow]]\naws_account = "{ACCOUNT}"\nsecurity_group = "{g}"\n'
                    f'description = "group {g}"\n\n' for g in groups)
    return (server(admin, server_extra) + sg
            + f'[[deployment]]\nname = "orders"\nlisten = "127.0.0.1:{port}"\nupstream = "{upstream}"\n\n'
            + rules)


def membership_file(group: str, members: list[str]) -> str:
    quoted = ", ".join(f'"{m}"' for m in members)
    return f'[[group]]\naws_account = "{ACCOUNT}"\nid = "{group}"\nmembers = [{quoted}]\n'


def members(m, group: str) -> float:
    return m.metric(MEMBERS, aws_account=ACCOUNT, security_group=group)


def refreshes(m, result: str) -> float:
    return m.metric(REFRESHES, result=result)


def wait_members(m, group: str, n: int, timeout: float = CONVERGE) -> float:
    return m.wait_metric(MEMBERS, n, timeout=timeout, aws_account=ACCOUNT, security_group=group)


def wait_admitted(port: int, src: str, timeout: float = CONVERGE):
    """Poll until a connection from `src` is proxied (echoes)."""
    def probe():
        try:
            assert_echoes(port, src, f"from {src}".encode(), timeout=5)
            return True
        except (OSError, EOFError, AssertionError):
            return False
    wait_until(probe, timeout, interval=0.1, what=f"{src} to be admitted")


def refused(port: int, src: str) -> bool:
    return is_refused(refusal_outcome(port, src, send=b"x"))


# --------------------------------------------------------------------------
# Admission from moto's answer
# --------------------------------------------------------------------------


def test_interface_in_group_admitted_after_first_refresh(moat, echo, ports, world, aws_env):
    web, other = world.group("web"), world.group("other")
    member, outsider, nobody = world.ip(5), world.ip(8), world.ip(9)
    world.eni(member, web)
    world.eni(outsider, other)  # an interface of another group must not count
    assert world.addresses(web) == {member}
    port, admin = ports(2)
    m = moat(config(admin, port, echo.address, world.moto.url, [web]), env=aws_env)

    wait_members(m, web, 1)
    assert refreshes(m, "success") >= 1
    assert_echoes(port, member, b"member of the group")
    echo.wait_connections(1)
    seen = echo.connection_count
    for src in (outsider, nobody):
        assert refused(port, src), f"{src} is not in {web} but was admitted"
    assert stays_false(lambda: echo.connection_count > seen, 0.3), "a non-member reached the upstream"
    assert refreshes(m, "failure") == 0, m.stderr_text()[-3000:]
    assert m.metric("moat_connections_total", deployment="orders", outcome="allowed") >= 1


def test_new_interface_admitted_after_a_refresh(moat, echo, ports, world, aws_env):
    web = world.group("web")
    first, second = world.ip(5), world.ip(6)
    world.eni(first, web)
    port, admin = ports(2)
    m = moat(config(admin, port, echo.address, world.moto.url, [web]), env=aws_env)
    wait_members(m, web, 1)
    assert refused(port, second)

    world.eni(second, web)
    wait_members(m, web, 2)
    assert_echoes(port, second, b"new interface")
    assert_echoes(port, first, b"old interface still in")


def test_secondary_private_ip_admitted_after_a_refresh(moat, echo, ports, world, aws_env):
    web = world.group("web")
    primary, secondary = world.ip(5), world.ip(7)
    eni = world.eni(primary, web)
    port, admin = ports(2)
    m = moat(config(admin, port, echo.address, world.moto.url, [web]), env=aws_env)
    wait_members(m, web, 1)
    assert refused(port, secondary)

    world.add_ip(eni, secondary)
    assert secondary in world.addresses(web)
    wait_members(m, web, 2)
    assert_echoes(port, secondary, b"secondary address")
    assert_echoes(port, primary, b"primary address")


def test_deleted_interface_revokes_live_connection(moat, echo, ports, world, aws_env):
    web = world.group("web")
    leaving, staying = world.ip(5), world.ip(6)
    gone = world.eni(leaving, web)
    world.eni(staying, web)
    port, admin = ports(2)
    m = moat(config(admin, port, echo.address, world.moto.url, [web], server_extra='on_revoke = "close"'),
             env=aws_env)
    wait_members(m, web, 2)
    doomed = echo_conn(port, leaving, b"about to leave")
    kept = echo_conn(port, staying, b"staying")
    try:
        assert m.metric(REVOKED, deployment="orders") == 0
        world.delete(gone)
        assert closed_by_peer(doomed, CONVERGE), "the connection of a departed member stayed open"
        m.wait_metric(REVOKED, 1, deployment="orders")
        assert members(m, web) == 1
        assert refused(port, leaving)
        # the member that stayed keeps its connection and is still admitted
        kept.sendall(b"still here")
        assert recv_exactly(kept, len(b"still here")) == b"still here"
        assert_echoes(port, staying, b"new connection of a member")
        assert m.metric(REVOKED, deployment="orders") == 1
    finally:
        doomed.close()
        kept.close()


def test_union_with_membership_file(moat, echo, ports, world, aws_env):
    web = world.group("web")
    from_api, from_file, in_both, nobody = world.ip(5), world.ip(9), world.ip(6), world.ip(10)
    world.eni(from_api, web)
    world.eni(in_both, web)
    port, admin = ports(2)
    m = moat(config(admin, port, echo.address, world.moto.url, [web], file="sg.toml"),
             {"sg.toml": membership_file(web, [from_file, in_both])}, env=aws_env)
    # the file's members apply from the start, the API's once a refresh succeeded
    wait_members(m, web, 3)  # {api, file, both}: a union, the shared address counted once
    assert refreshes(m, "success") >= 1
    for src in (from_api, from_file, in_both):
        assert_echoes(port, src, f"member {src}".encode())
    assert refused(port, nobody)


def test_unreachable_api_keeps_last_members(moat, echo, ports, moto_fn, aws_env):
    world = Ec2World(moto_fn)
    web = world.group("web")
    member = world.ip(5)
    world.eni(member, web)
    port, admin = ports(2)
    m = moat(config(admin, port, echo.address, moto_fn.url, [web]), env=aws_env)
    wait_members(m, web, 1)
    live = echo_conn(port, member, b"before the outage")
    try:
        failures = refreshes(m, "failure")
        moto_fn.stop()  # the API is gone
        # 1 s, 2 s, 4 s backoff (capped by refresh): several failed refreshes within a few refreshes
        m.wait_metric(REFRESHES, lambda v: v >= failures + 3, timeout=45, result="failure")
        assert members(m, web) == 1, "the group shrank because the API was unreachable"
        live.sendall(b"during the outage")
        assert recv_exactly(live, len(b"during the outage")) == b"during the outage"
        assert_echoes(port, member, b"new connection during the outage")
        assert m.metric(REVOKED, deployment="orders") == 0
        assert m.running()
        assert re.search(r"security group refresh failed", m.stderr_text()), m.stderr_text()[-3000:]
    finally:
        live.close()


def test_reload_keeps_api_members(moat, echo, ports, world, aws_env):
    """A config reload that leaves the group rule alone keeps the members the
    API returned: no connection of theirs is revoked, they stay admitted."""
    web = world.group("web")
    member = world.ip(5)
    world.eni(member, web)
    port, admin = ports(2)
    text = config(admin, port, echo.address, world.moto.url, [web])
    m = moat(text, env=aws_env)
    wait_members(m, web, 1)
    live = echo_conn(port, member, b"before the reload")
    try:
        m.write_config(text + '[[deployment.allow]]\ncidr = "192.0.2.0/24"\ndescription = "doc net"\n')
        m.wait_metric("moat_config_reloads_total", 1, result="success")
        assert members(m, web) == 1
        assert_echoes(port, member, b"after the reload")
        live.sendall(b"survived")
        assert recv_exactly(live, len(b"survived")) == b"survived"
        assert m.metric(REVOKED, deployment="orders") == 0
    finally:
        live.close()


def test_group_added_by_reload_is_resolved(moat, echo, ports, world, aws_env):
    """A rule for another group added by a reload is resolved by the next
    refreshes, without a restart."""
    web, db = world.group("web"), world.group("db")
    web_ip, db_ip = world.ip(5), world.ip(6)
    world.eni(web_ip, web)
    world.eni(db_ip, db)
    port, admin = ports(2)
    m = moat(config(admin, port, echo.address, world.moto.url, [web]), env=aws_env)
    wait_members(m, web, 1)
    assert refused(port, db_ip)
    m.write_config(config(admin, port, echo.address, world.moto.url, [web, db]))
    m.wait_metric("moat_config_reloads_total", 1, result="success")
    wait_members(m, db, 1)
    assert_echoes(port, db_ip, b"member of the added group")
    assert_echoes(port, web_ip, b"member of the first group")


def test_removing_aws_resolver_drops_api_members(moat, echo, ports, world, aws_env):
    """SPEC 3.8: without `[security_groups] aws` a group's members are those of
    the membership file. A reload that removes the resolver must not keep
    admitting the addresses the API once returned."""
    web = world.group("web")
    from_api, from_file = world.ip(5), world.ip(9)
    world.eni(from_api, web)
    port, admin = ports(2)
    files = {"sg.toml": membership_file(web, [from_file])}
    m = moat(config(admin, port, echo.address, world.moto.url, [web], file="sg.toml"), files, env=aws_env)
    wait_members(m, web, 2)
    live = echo_conn(port, from_api, b"member through the API")
    try:
        file_only = config(admin, port, echo.address, world.moto.url, [web], file="sg.toml")
        file_only = re.sub(r"^aws = .*\n", "", file_only, flags=re.M)
        assert "aws =" not in file_only
        m.write_config(file_only)
        m.wait_metric("moat_config_reloads_total", 1, result="success")
        assert_echoes(port, from_file, b"file member")
        assert closed_by_peer(live, CONVERGE), "the connection of an address only the removed resolver knew stayed open"
        assert refused(port, from_api), "an address only the (now removed) EC2 resolver knew is still admitted"
        assert members(m, web) == 1
        m.wait_metric(REVOKED, 1, deployment="orders")
    finally:
        live.close()


def test_explain_resolves_through_ec2(world, aws_env, tmp_path):
    """`moat explain` asks the EC2 API too, and names where the member came from."""
    web = world.group("web")
    from_api, from_file, nobody = world.ip(5), world.ip(9), world.ip(10)
    world.eni(from_api, web)
    d = tmp_path / "explain"
    d.mkdir()
    (d / "sg.toml").write_text(membership_file(web, [from_file]))
    (d / "moat.toml").write_text(config(9, 27017, "127.0.0.1:27018", world.moto.url, [web], file="sg.toml"))

    def explain(ip):
        return run_moat(["explain", "-c", str(d / "moat.toml"), "--deployment", "orders", ip], cwd="/", env=aws_env)

    res = explain(from_api)
    assert res.code == 0, res.output
    assert res.stdout == f'allow orders {from_api} by "group {web}" ({from_api}/32)\n', res.output
    assert web in res.stderr and "(EC2 API)" in res.stderr, res.output
    res = explain(from_file)
    assert res.code == 0, res.output
    assert "(membership file)" in res.stderr, res.output
    res = explain(nobody)
    assert res.code == 1, res.output
    assert res.stdout.startswith(f"deny orders {nobody}"), res.output


# --------------------------------------------------------------------------
# A paginating EC2 endpoint (moto does not paginate)
# --------------------------------------------------------------------------

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"


def _interface_xml(i: int, group: str, primary: str, secondary=(), ipv6=()) -> str:
    privs = "".join(
        f"<item><privateIpAddress>{ip}</privateIpAddress><primary>{'true' if k == 0 else 'false'}</primary></item>"
        for k, ip in enumerate([primary, *secondary]))
    v6 = "".join(f"<item><ipv6Address>{ip}</ipv6Address></item>" for ip in ipv6)
    return (
        "<item>"
        f"<networkInterfaceId>eni-{i:017x}</networkInterfaceId>"
        "<subnetId>subnet-0123456789abcdef0</subnetId>"
        "<vpcId>vpc-0123456789abcdef0</vpcId>"
        "<availabilityZone>us-east-1a</availabilityZone>"
        "<description/>"
        f"<ownerId>{ACCOUNT}</ownerId>"
        "<requesterManaged>false</requesterManaged>"
        "<status>in-use</status>"
        "<macAddress>02:00:00:00:00:01</macAddress>"
        f"<privateIpAddress>{primary}</privateIpAddress>"
        "<sourceDestCheck>true</sourceDestCheck>"
        f"<groupSet><item><groupId>{group}</groupId><groupName>web</groupName></item></groupSet>"
        f"<privateIpAddressesSet>{privs}</privateIpAddressesSet>"
        + (f"<ipv6AddressesSet>{v6}</ipv6AddressesSet>" if v6 else "<ipv6AddressesSet/>")
        + "<tagSet/>"
        "<interfaceType>interface</interfaceType>"
        "</item>"
    )


class Signature:
    """The SigV4 signature of one request, and whether botocore (an
    independent SigV4 implementation) computes the same one from the request
    as received, when the secret key is known (the static test credentials)."""

    SECRETS = {"testing": "testing"}

    def __init__(self, access_key: str, token: str | None, valid: bool | None):
        self.access_key, self.token, self.valid = access_key, token, valid

    @classmethod
    def of(cls, handler: BaseHTTPRequestHandler, body: str) -> "Signature":
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials
        auth = handler.headers.get("Authorization", "")
        m = re.match(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/ec2/aws4_request, "
                     r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$", auth)
        if not m:
            return cls("", None, False)
        key, _day, region, signed, signature = m.groups()
        token = handler.headers.get("X-Amz-Security-Token")
        secret = cls.SECRETS.get(key)
        if secret is None or region != REGION:
            return cls(key, token, None if secret is None else False)
        headers = {h: handler.headers[h] for h in signed.split(";")}
        req = AWSRequest(method="POST", url=f"http://{headers['host']}{handler.path}", data=body.encode(),
                         headers=headers)
        req.context["timestamp"] = headers["x-amz-date"]
        signer = SigV4Auth(Credentials(key, secret, token), "ec2", REGION)
        expected = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
        return cls(key, token, expected == signature)


class PagingEc2:
    """DescribeNetworkInterfaces, `page_size` interfaces a page, NextToken
    "page-2", "page-3", ...; `fail_page` (1-based) answers HTTP 500.
    `interfaces`: [(primary, [secondary...], [ipv6...])] of `group`."""

    def __init__(self, group: str, interfaces, page_size: int = 3, port: int = 0):
        self.group = group
        self.interfaces = list(interfaces)
        self.page_size = page_size
        self.fail_page: int | None = None
        self.requests: list[dict[str, str]] = []
        self.signatures: list[Signature] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n).decode()
                params = {k: v[0] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}
                with outer.lock:
                    outer.signatures.append(Signature.of(self, body))
                status, xml = outer.answer(params)
                data = xml.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/xml;charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True, name="paging-ec2")
        self.thread.start()

    @staticmethod
    def _error(status: int, code: str, message: str) -> tuple[int, str]:
        return status, (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>"
                        f"<Message>{message}</Message></Error></Errors><RequestID>moat-e2e</RequestID></Response>")

    def answer(self, p: dict[str, str]) -> tuple[int, str]:
        with self.lock:
            self.requests.append(p)
            fail_page = self.fail_page
        if p.get("Action") != "DescribeNetworkInterfaces":
            return self._error(400, "InvalidAction", f"unexpected action {p.get('Action')}")
        if p.get("Filter.1.Name") != "group-id":
            return self._error(400, "InvalidParameterValue", "expected a group-id filter")
        mine = p.get("Filter.1.Value.1") == self.group
        items = self.interfaces if mine else []
        token = p.get("NextToken")
        page = 1 if not token else int(token.removeprefix("page-"))
        if page == fail_page:
            return self._error(500, "InternalError", "An internal error has occurred")
        chunk = items[(page - 1) * self.page_size: page * self.page_size]
        has_more = page * self.page_size < len(items)
        xml = "".join(_interface_xml((page - 1) * self.page_size + i, self.group, *iface)
                      for i, iface in enumerate(chunk))
        nxt = f"<nextToken>page-{page + 1}</nextToken>" if has_more else ""
        return 200, (f'<?xml version="1.0" encoding="UTF-8"?>\n'
                     f'<DescribeNetworkInterfacesResponse xmlns="{EC2_NS}">'
                     f"<requestId>59dbff89-35bd-4eac-99ed-be587ed81825</requestId>"
                     f"<networkInterfaceSet>{xml}</networkInterfaceSet>{nxt}"
                     f"</DescribeNetworkInterfacesResponse>")

    def tokens_seen(self) -> set[str | None]:
        with self.lock:
            return {r.get("NextToken") for r in self.requests}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def paging_ec2():
    made: list[PagingEc2] = []

    def make(*a, **kw) -> PagingEc2:
        s = PagingEc2(*a, **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


PAGED_GROUP = "sg-0123456789abcdef0"


def paged_interfaces():
    """9 interfaces (3 pages of 3): 127.0.200.10..18, the second with a
    secondary address 127.0.200.30, the fourth with an IPv6 address."""
    out = []
    for i in range(9):
        secondary = ["127.0.200.30"] if i == 1 else []
        ipv6 = ["2001:db8::4"] if i == 3 else []
        out.append((f"127.0.200.{10 + i}", secondary, ipv6))
    return out


def test_all_pages_are_members(moat, echo, ports, paging_ec2, aws_env):
    api = paging_ec2(PAGED_GROUP, paged_interfaces(), page_size=3)
    port, admin = ports(2)
    m = moat(config(admin, port, echo.address, api.url, [PAGED_GROUP]), env=aws_env)
    wait_members(m, PAGED_GROUP, 11)  # 9 primaries + 1 secondary + 1 IPv6
    assert {None, "page-2", "page-3"} <= api.tokens_seen(), api.requests
    assert all(r.get("MaxResults") for r in api.requests), api.requests
    with api.lock:
        sigs = list(api.signatures)
    assert sigs and all(s.access_key == "testing" and s.token is None for s in sigs)
    assert all(s.valid for s in sigs), "a request's SigV4 signature is not the one botocore computes"
    for src in ("127.0.200.10", "127.0.200.14", "127.0.200.18", "127.0.200.30"):  # pages 1, 2, 3, a secondary
        assert_echoes(port, src, f"paged member {src}".encode())
    assert refused(port, "127.0.200.19")


def test_account_role_is_assumed_through_sts(moat, echo, ports, moto_session, paging_ec2, aws_env):
    """A group of an account listed in `accounts` is read with the role's
    temporary credentials, obtained from STS (moto's) with AssumeRole: the EC2
    requests carry the assumed access key and its session token."""
    role = f"arn:aws:iam::{ACCOUNT}:role/moat-reader"
    api = paging_ec2(PAGED_GROUP, [("127.0.202.10", [], []), ("127.0.202.11", [], [])])
    port, admin = ports(2)
    env = {**aws_env, "AWS_ENDPOINT_URL_STS": moto_session.url}
    m = moat(config(admin, port, echo.address, api.url, [PAGED_GROUP], role_arn=role), env=env)
    wait_members(m, PAGED_GROUP, 2)
    assert_echoes(port, "127.0.202.11", b"member read with the assumed role")
    with api.lock:
        sigs = list(api.signatures)
    assert sigs, api.requests
    for s in sigs:
        assert s.access_key and s.access_key != "testing", "EC2 was called with the default credentials"
        assert s.token, "temporary credentials without their session token"
        assert s.valid is not False


def test_failed_page_keeps_previous_members(moat, echo, ports, paging_ec2, aws_env):
    api = paging_ec2(PAGED_GROUP, paged_interfaces(), page_size=3)
    port, admin = ports(2)
    m = moat(config(admin, port, echo.address, api.url, [PAGED_GROUP]), env=aws_env)
    wait_members(m, PAGED_GROUP, 11)
    on_page_3 = "127.0.200.17"
    live = echo_conn(port, on_page_3, b"member from page 3")
    try:
        failures = refreshes(m, "failure")
        with api.lock:
            api.fail_page = 2  # page 1 still answers: a partial answer must not shrink the group
        m.wait_metric(REFRESHES, lambda v: v >= failures + 2, timeout=30, result="failure")
        assert members(m, PAGED_GROUP) == 11, "the group shrank to what page 1 listed"
        assert_echoes(port, on_page_3, b"still a member")
        assert_echoes(port, "127.0.200.10", b"page 1 member")
        live.sendall(b"not revoked")
        assert recv_exactly(live, len(b"not revoked")) == b"not revoked"
        assert m.metric(REVOKED, deployment="orders") == 0
    finally:
        live.close()


def test_unreachable_api_at_start_then_recovers(moat, echo, ports, paging_ec2, aws_env):
    """SPEC 3.8: an unreachable API never stops moat from starting; the file's
    members apply until a refresh succeeds."""
    port, admin, api_port = ports(3)
    from_file = "127.0.201.9"
    m = moat(config(admin, port, echo.address, f"http://127.0.0.1:{api_port}", [PAGED_GROUP], file="sg.toml"),
             {"sg.toml": membership_file(PAGED_GROUP, [from_file])}, env=aws_env)
    assert_echoes(port, from_file, b"file member, API down")
    m.wait_metric(REFRESHES, lambda v: v >= 1, timeout=CONVERGE, result="failure")
    assert members(m, PAGED_GROUP) == 1
    assert refused(port, "127.0.201.10")

    paging_ec2(PAGED_GROUP, [("127.0.201.10", [], []), ("127.0.201.11", [], [])], port=api_port)
    wait_members(m, PAGED_GROUP, 3)  # backoff is capped by refresh: it comes back within a few seconds
    assert refreshes(m, "success") >= 1
    for src in (from_file, "127.0.201.10", "127.0.201.11"):
        assert_echoes(port, src, f"member {src}".encode())


# --------------------------------------------------------------------------
# moat check
# --------------------------------------------------------------------------

CHECK_BASE = """\
[security_groups]
{aws}

[[deployment]]
name = "orders"
listen = "127.0.0.1:27017"
upstream = "127.0.0.1:27018"

[[deployment.allow]]
aws_account = "123456789012"
security_group = "sg-0a1b2c3d"
description = "web tier"
"""

LOC = re.compile(r"moat\.toml:(\d+):(\d+)")


def _locations(output: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in LOC.findall(output)]


def test_check_accepts_aws_table(check):
    text = CHECK_BASE.format(aws='[security_groups.aws]\nregion = "us-east-1"\nrefresh = "5s"\n'
                                 'endpoint = "http://127.0.0.1:4566"\n'
                                 '[security_groups.aws.accounts."210987654321"]\n'
                                 'role_arn = "arn:aws:iam::210987654321:role/moat-reader"\n')
    res = check(text)
    assert res.code == 0, res.output
    # with an EC2 resolver a group absent from the (missing) file is not a problem
    assert not re.search(r"membership file", res.output, re.I), res.output


def test_check_accepts_inline_aws_table(check):
    text = CHECK_BASE.format(aws='aws = { region = "eu-west-3", refresh = "60s" }')
    res = check(text)
    assert res.code == 0, res.output


@pytest.mark.parametrize("key,bad,words", [
    ("region", '""', ["region"]),
    ("region", '"us east 1"', ["region"]),
    ("refresh", '"1s"', ["refresh", "5s"]),
    ("refresh", '"0s"', ["refresh"]),
    ("refresh", '"soon"', ["refresh"]),
    ("endpoint", '"ftp://x"', ["endpoint", "ftp://x"]),
])
def test_check_rejects_bad_aws_value(check, key, bad, words):
    values = {"region": '"us-east-1"', "refresh": '"5s"', "endpoint": '"http://127.0.0.1:4566"'}
    values[key] = bad
    aws = "[security_groups.aws]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
    text = CHECK_BASE.format(aws=aws)
    res = check(text)
    assert res.code == 1, f"expected exit 1\n{res.output}"
    line = line_of(text, f"{key} = {bad}")
    value_col = text.splitlines()[line - 1].index(bad) + 1
    locs = _locations(res.output)
    assert any(l == line and c in (1, value_col, value_col + 1) for l, c in locs), (
        f"no error at moat.toml:{line}:{value_col}; found {locs}\n{res.output}")
    for w in words:
        assert re.search(re.escape(w), res.output, re.I), f"{w!r} not in output:\n{res.output}"


@pytest.mark.parametrize("account", ["1234", "1234567890123", "12345678901a"])
def test_check_rejects_bad_accounts_key(check, account):
    aws = ('aws = { region = "us-east-1", accounts = { '
           f'"{account}" = {{ role_arn = "arn:aws:iam::123456789012:role/r" }} }} }}')
    text = CHECK_BASE.format(aws=aws)
    res = check(text)
    assert res.code == 1, f"expected exit 1\n{res.output}"
    line = line_of(text, "accounts")
    col = text.splitlines()[line - 1].index(f'"{account}"') + 1
    locs = _locations(res.output)
    assert any(l == line and c in (col, col + 1) for l, c in locs), (
        f"no error at moat.toml:{line}:{col}; found {locs}\n{res.output}")
    assert account in res.output


def test_check_lists_every_aws_problem_on_one_line(check):
    aws = ('aws = { region = "", refresh = "1s", endpoint = "ftp://x", '
           'accounts = { "1234" = { role_arn = "arn:aws:iam::123456789012:role/r" } } }')
    text = CHECK_BASE.format(aws=aws)
    res = check(text)
    assert res.code == 1, res.output
    line = line_of(text, "aws = {")
    line_text = text.splitlines()[line - 1]
    locs = {c for l, c in _locations(res.output) if l == line}
    for needle in ('""', '"1s"', '"ftp://x"', '"1234"'):
        col = line_text.index(needle) + 1
        assert locs & {col, col + 1}, f"no error at moat.toml:{line}:{col} ({needle}); found {sorted(locs)}\n{res.output}"
