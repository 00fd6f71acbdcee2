"""Fill in ops/haproxy/haproxy.cfg for a set of nodes:

    python3 ops/haproxy/render.py --dicom-port 11112 --http-port 8080 \\
        --stats-socket /run/haproxy-stowage.sock \\
        --node a=10.0.0.11:11112:8080 --node b=10.0.0.12:11112:8080 > haproxy.cfg

Each --node is NAME=HOST:DICOM_PORT[:HTTP_PORT]; a node without an HTTP port serves DICOM only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

TEMPLATE = Path(__file__).with_name("haproxy.cfg")


def node(text: str) -> tuple[str, str, int, int | None]:
    try:
        name, _, where = text.partition("=")
        host, dicom, *http = where.split(":")
        return name, host, int(dicom), int(http[0]) if http else None
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=HOST:DICOM_PORT[:HTTP_PORT]") from None


def render(dicom_port: int, http_port: int, stats_socket: str, nodes: list[tuple[str, str, int, int | None]],
           source: str = "") -> str:
    """The configuration; `source`: the address the balancer connects to the nodes from
    (what the nodes' proxy_protocol_from names), else the system's choice."""
    extra = f" source {source}" if source else ""
    dicom = "\n".join(f"    server {n} {h}:{p} check{extra}" for n, h, p, _ in nodes)
    http = "\n".join(f"    server {n} {h}:{w} check{extra}" for n, h, _, w in nodes if w)
    return (TEMPLATE.read_text().replace("@DICOM_PORT@", str(dicom_port)).replace("@HTTP_PORT@", str(http_port))
            .replace("@STATS_SOCKET@", stats_socket).replace("@DICOM_SERVERS@", dicom)
            .replace("@HTTP_SERVERS@", http or "    # no node serves HTTP"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dicom-port", type=int, default=11112)
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--stats-socket", default="/run/haproxy-stowage.sock")
    ap.add_argument("--node", type=node, action="append", required=True)
    ap.add_argument("--source", default="", help="connect to the nodes from this address")
    args = ap.parse_args()
    sys.stdout.write(render(args.dicom_port, args.http_port, args.stats_socket, args.node, args.source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
