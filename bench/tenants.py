"""scripts/bench tenants: what serving several clients costs, and what fair share gives them.

  auth   web-resize throughput (1000 x 1080p JPEG: resize=50, blur=5, one job) on a server
         without tokens, against one with a tokens file of 1,000 tokens (the job submitted
         with one of them), alternating rounds in one run; target: >= 0.98x
  share  token B's 12-image job submitted behind token A's 8 jobs of 12 images, on one
         worker: B's time from submission to done, against B's job alone

Writes docs/benchmarks-tenants.md and prints it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from inputs import make_inputs  # noqa: E402
from servers import Server, body, fresh_root, machine  # noqa: E402

#: Images of the web-resize job: about five seconds a round, so that the machine's noise
#: averages out of what one request's authorisation might cost.
IMAGES = 1000


def add_token(tokens: Path, name: str, *options: str) -> str:
    """A token added to ``tokens`` by the command line; its secret."""
    return subprocess.run([sys.executable, "-m", "imgserver", "token", "add", name, *options,
                           "--tokens", str(tokens)], check=True, capture_output=True,
                          text=True).stdout.strip()


def post(server: Server, body: bytes, secret: str | None, wait: bool = True) -> dict:
    """POST /jobs (with ?wait=true), with ``secret`` as the bearer token if given."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    headers = {"Content-Type": "application/json"}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    try:
        connection.request("POST", "/jobs?wait=true" if wait else "/jobs", body=body,
                           headers=headers)
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status not in (200, 202):
            raise RuntimeError(f"imgserver answered {response.status}: {answer}")
        return answer
    finally:
        connection.close()


def auth_cost(work: Path, rounds: int, processes: int) -> dict[str, float]:
    """web-resize images/s without tokens and with 1,000, alternating; the best round each."""
    inputs = make_inputs(work / "in", "photo", 20, 1920, 1080, ".jpg")
    tokens = work / "tokens.json"
    tokens.unlink(missing_ok=True)
    secret = add_token(tokens, "bench")
    _fill(tokens, 999)  # written in one go: the command, 999 times, would take minutes
    best = {"none": 0.0, "1000 tokens": 0.0}
    for _ in range(rounds):
        for kind in best:
            root = _root(work, kind, inputs)
            extra = ["--tokens", str(tokens)] if kind != "none" else []
            server = Server(root, processes, extra)
            try:
                pairs = [(f"in/{inputs[n % len(inputs)].name}", f"out/{n:04d}.jpg")
                         for n in range(IMAGES)]
                post(server, body(pairs[:10], ["resize=50"]), secret if extra else None)
                started = time.perf_counter()
                post(server, body(pairs, ["resize=50", "blur=5"]), secret if extra else None)
                best[kind] = max(best[kind], IMAGES / (time.perf_counter() - started))
            finally:
                server.stop()
    return best


def _fill(tokens: Path, count: int) -> None:
    """``count`` more tokens in the file, as the command would write them (hashes of
    secrets nobody keeps)."""
    sys.path.insert(0, str(REPO))
    from imgserver.access.tokens import Token, TokenFile, digest, new_secret

    file = TokenFile(tokens)
    document = {"version": 1, "tokens": [token.to_document() for token in file.read()] + [
        Token(f"f{number}", digest(new_secret())).to_document() for number in range(count)]}
    tokens.write_text(json.dumps(document, indent=2))
    tokens.chmod(0o600)


def _root(work: Path, name: str, inputs: list[Path]) -> Path:
    root = fresh_root(work, f"root-{name.replace(' ', '-')}", inputs)
    for folder in ("out", "a", "b"):
        (root / folder).mkdir()
    return root


def fair_share(work: Path, rounds: int) -> dict[str, float]:
    """Seconds for B's 12 images, alone and behind A's 8 x 12, on one worker (medians)."""
    inputs = make_inputs(work / "in", "photo", 20, 1920, 1080, ".jpg")
    times: dict[str, list[float]] = {"alone": [], "behind": [], "a_image": []}
    for _ in range(rounds):
        for case in ("alone", "behind"):
            root = _root(work, f"share-{case}", inputs)
            for folder in ("a", "b"):
                shutil.copytree(root / "in", root / folder / "in")
            tokens = root / "tokens.json"
            secrets = {name: add_token(tokens, name, "--folder", name) for name in ("a", "b")}
            server = Server(root, 1, ["--tokens", str(tokens)])
            try:
                mine = body([(f"in/{inputs[n].name}", f"b{n}.jpg") for n in range(12)],
                            ["resize=50", "blur=5"])
                if case == "behind":
                    for job in range(8):
                        post(server, body([(f"in/{inputs[n].name}", f"a{job}-{n}.jpg")
                                           for n in range(12)], ["resize=50", "blur=5"]),
                             secrets["a"], wait=False)
                started = time.perf_counter()
                post(server, mine, secrets["b"])
                times[case].append(time.perf_counter() - started)
                if case == "alone":
                    times["a_image"].append(times[case][-1] / 12)
            finally:
                server.stop()
    return {key: statistics.median(values) for key, values in times.items()}


def report(results: dict[str, dict[str, float]], rounds: int) -> str:
    lines = ["# Serving several clients: benchmarks", "",
             f"Measured by `scripts/bench tenants` on {time.strftime('%Y-%m-%d')}, in one run.",
             ""]
    if "auth" in results:
        auth = results["auth"]
        ratio = auth["1000 tokens"] / auth["none"]
        lines += ["## The cost of authorisation", "",
                  f"web-resize ({IMAGES} × 1080p JPEG, `resize=50`, `blur=5`, one job over "
                  "HTTP), "
                  f"best of {rounds} alternating rounds: a server without tokens, and one "
                  "with a tokens file of 1,000 tokens (the job submitted with one of them).",
                  "", "| server | images/s |", "|---|---:|",
                  f"| no tokens | {auth['none']:.1f} |",
                  f"| 1,000 tokens | {auth['1000 tokens']:.1f} |", "",
                  f"Ratio: **{ratio:.3f}×** (target ≥ 0.98×: "
                  f"{'met' if ratio >= 0.98 else 'missed'}). A request's token is found by the "
                  "SHA-256 digest of its secret in a dictionary: its cost does not grow with "
                  "the number of tokens.", ""]
    if "share" in results:
        share = results["share"]
        lines += ["## Fair share between tokens", "",
                  "Token B's job of 12 images (1080p JPEG, `resize=50`, `blur=5`), submitted "
                  "just after token A's 8 jobs of 12 images, on one worker, against B's job "
                  f"alone (medians of {rounds} rounds):", "",
                  "| B's job | seconds |", "|---|---:|",
                  f"| alone | {share['alone']:.2f} |",
                  f"| behind A's 96 images | {share['behind']:.2f} |", "",
                  f"Behind the flood, B takes {share['behind'] / share['alone']:.2f}× its time "
                  "alone. Round-robin over the tokens gives B every other image: about 2× "
                  "alone (A's 96 images would take "
                  f"{96 * share['a_image']:.1f} s at that pace, and round-robin over the 9 "
                  "jobs instead of the 2 tokens would make B's job about 9× as long).", ""]
    lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in machine().items()] + [""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=["auth", "share"],
                        default=["auth", "share"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "tenants")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks-tenants.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    if "auth" in args.only:
        results["auth"] = auth_cost(args.work, args.rounds, args.processes)
    if "share" in args.only:
        results["share"] = fair_share(args.work, args.rounds)
    text = report(results, args.rounds)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
