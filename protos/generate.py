"""Generate the Python protobuf/gRPC stubs from protos/ into clients/ (run after editing a .proto).

Usage: python protos/generate.py [OUTPUT_ROOT]   (default: clients/, the committed stubs)
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUTPUT = PROTO_ROOT.parent / "clients"


def generate(output_root: Path = DEFAULT_OUTPUT) -> list[Path]:
    """Run protoc (from grpcio-tools) on every .proto under protos/; return the files written."""
    from grpc_tools import protoc

    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
    output_root.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={output_root}", f"--pyi_out={output_root}",
            f"--grpc_python_out={output_root}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(protos))
    written = []
    for proto in protos:
        stem = output_root / proto[: -len(".proto")]
        written += [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2.pyi"), Path(f"{stem}_pb2_grpc.py")]
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT):
        print(path)
