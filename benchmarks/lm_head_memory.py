"""Peak memory and time of the LM head + log-prob, naive vs chunked, forward + backward.

    python benchmarks/lm_head_memory.py                       # Qwen2.5-0.5B head, 8192 tokens
    python benchmarks/lm_head_memory.py --tokens 2048 --repeats 3 --chunk-rows 128,256,1024
    python benchmarks/lm_head_memory.py --chunk-rows 256,256:2048     # 256-row chunks, 2048 MiB of logits saved

The problem: hidden states ``[tokens, 896]`` (float32), the head weight ``[151936, 896]``
(Qwen2.5-0.5B's hidden size and vocabulary), random chosen ids, temperature 0.7; the loss is
``sum(logp * w)`` with random ``w``; gradients for hidden and weight. Variants:

* naive: ``log_softmax((h @ W.T) / tau).gather(ids)``, autograd (the ``[tokens, V]`` logits,
  their scaled copy, the log-softmax saved for backward, and their gradients);
* chunked: ``rlopt.algorithms.lm_head.chunked_lm_head_logprobs`` with ``chunk_rows`` rows per
  chunk (its own backward: recomputes each chunk's logits). ``ROWS:MIB`` keeps up to ``MIB``
  MiB of logits from the forward for the backward (``saved_rows``): those chunks are not recomputed.

Memory method: each variant runs in a fresh subprocess. After building the inputs (and a
small warm-up so that libraries and thread pools are loaded) the process resets the kernel's
peak-RSS mark (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``), runs one forward +
backward, and reads ``VmHWM`` from ``/proc/self/status``: peak delta = VmHWM - RSS before the
run. This counts every byte that torch's CPU allocator touched (tracemalloc sees none of it).
Gradients (of hidden and weight) are allocated in both variants and included. If
``clear_refs`` is not permitted, a 1 ms RSS-polling thread is used instead (it can miss
short spikes; the output says which method ran). With ``--device cuda`` the peak is
``torch.cuda.max_memory_allocated()`` above the allocation before the run (exact), and the
time is taken after ``torch.cuda.synchronize()``. The max gradient difference compares the
chunked run's gradients with the naive run's (saved to a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Poller:
    def __init__(self) -> None:
        self.peak, self.stop = _rss_bytes(), False
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)


def worker(a) -> dict:
    import torch

    from rlopt.algorithms.lm_head import chunked_lm_head_logprobs, saved_rows_for

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(a.tokens, a.hidden, generator=g)).to(dev).requires_grad_(True)
    w = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).to(dev).requires_grad_(True)
    ids = torch.randint(0, a.vocab, (a.tokens,), generator=g).to(dev)
    up = torch.randn(a.tokens, generator=g).to(dev)
    tau = a.temperature

    if a.variant == "f64":  # the reference: the chunked path in float64 (tests: == naive float64 to 1e-11)
        h = h.detach().double().requires_grad_(True)
        w = w.detach().double().requires_grad_(True)
        up = up.double()

    def run(hh, ww, ii, uu):
        if a.variant == "f64":
            logp = chunked_lm_head_logprobs(hh, ww, ii, temperature=tau, chunk_rows=256)
        elif a.variant == "naive":
            logp = torch.log_softmax((hh @ ww.t()) / tau, dim=-1).gather(-1, ii[:, None]).squeeze(-1)
        else:
            rows, _, mib = a.variant.partition(":")
            logp = chunked_lm_head_logprobs(hh, ww, ii, temperature=tau, chunk_rows=int(rows),
                                            saved_rows=saved_rows_for(ww.shape[0], float(mib or 0)))
        (logp * uu).sum().backward()

    # warm-up on a small slice (loads kernels, thread pools); then drop its gradients
    hs = h.detach()[:64].clone().requires_grad_(True)
    run(hs, w, ids[:64], up[:64])
    w.grad = None
    times, peaks = [], []
    method = "cuda max_memory_allocated" if cuda else "VmHWM"
    for _ in range(a.repeats):
        h.grad = w.grad = None
        if cuda:  # exact: the caching allocator's own peak counter
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            run(h, w, ids, up)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            peaks.append(torch.cuda.max_memory_allocated() - base)
            continue
        base = _rss_bytes()
        if not _reset_hwm():
            method = "poll"
        poller = None
        if method == "poll":
            poller = _Poller()
            poller.t.start()
        t0 = time.perf_counter()
        run(h, w, ids, up)
        times.append(time.perf_counter() - t0)
        if poller is not None:
            poller.stop = True
            poller.t.join()
            peaks.append(poller.peak - base)
        else:
            peaks.append(_hwm_bytes() - base)
    if a.save_grads:
        torch.save({"h": h.grad.cpu(), "w": w.grad.cpu()}, a.save_grads)
    return dict(variant=a.variant, times=times, peaks=peaks, method=method)


def _name(variant: str) -> str:
    if variant in ("naive", "f64"):
        return {"naive": "naive", "f64": "float64 reference"}[variant]
    rows, _, mib = variant.partition(":")
    return f"chunked, {rows} rows" + (f", {mib} MiB saved" if mib else "")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--chunk-rows", default="256",
                    help="comma-separated chunk sizes to measure; ROWS:MIB also keeps MIB MiB of logits for the backward")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--f64-reference", action="store_true",
                    help="also compute the gradients in float64 and report each variant's error against them")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (peak = torch.cuda.max_memory_allocated)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--save-grads", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.variant:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return

    import torch

    tmp = tempfile.mkdtemp(prefix="lmhead-")
    variants = ([] if a.skip_naive else ["naive"]) + a.chunk_rows.split(",") + (["f64"] if a.f64_reference else [])
    print(f"# LM head fwd+bwd: {a.tokens} tokens x hidden {a.hidden} x vocab {a.vocab}, float32, tau {a.temperature}, "
          f"{a.threads} threads, {a.repeats} repeat(s), {os.cpu_count()} CPU cores, device {a.device}; "
          f"logits alone would be {a.tokens * a.vocab * 4 / 2**30:.2f} GiB, the weight {a.vocab * a.hidden * 4 / 2**30:.2f} GiB",
          flush=True)
    results = {}
    for v in variants:
        grads = os.path.join(tmp, f"{v}.pt")
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", v, "--save-grads", grads]
        for k in ("tokens", "hidden", "vocab", "temperature", "repeats", "threads", "device"):
            cmd += [f"--{k}", str(getattr(a, k))]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            print(f"  {v}: FAILED rc={p.returncode} (killed for memory if -9) {p.stderr[-500:]}", flush=True)
            continue
        r = json.loads(lines[-1][7:])
        r["grads"] = grads
        results[v] = r
        print(f"  {_name(v):18s}: peak +{statistics.median(r['peaks']) / 2**20:8.0f} MiB "
              f"[{r['method']}]  time {statistics.median(r['times']):7.2f} s  (runs {[round(t, 2) for t in r['times']]})",
              flush=True)
    if "f64" in results:
        ref64 = torch.load(results["f64"]["grads"])
        print("\n| variant | max abs error vs float64, hidden grad | weight grad | weight grad, relative to its largest |")
        print("|---|---|---|---|")
        for v, r in results.items():
            if v == "f64":
                continue
            g = torch.load(r["grads"])
            eh = (g["h"].double() - ref64["h"]).abs().max().item()
            ew = (g["w"].double() - ref64["w"]).abs().max().item()
            print(f"| {_name(v)} | {eh:.2e} | {ew:.2e} | {ew / ref64['w'].abs().max().item():.1e} |")
        os.remove(results.pop("f64")["grads"])
    if "naive" in results:
        n = results["naive"]
        ref = torch.load(n["grads"])
        print("\n| variant | peak memory (MiB above inputs) | vs naive | time (s, median) | vs naive | max abs grad diff (hidden / weight) |")
        print("|---|---|---|---|---|---|")
        pn, tn = statistics.median(n["peaks"]), statistics.median(n["times"])
        print(f"| naive | {pn / 2**20:.0f} | 1 | {tn:.2f} | 1.00x | - |")
        for v, r in results.items():
            if v == "naive":
                continue
            g = torch.load(r["grads"])
            dh = (g["h"] - ref["h"]).abs().max().item()
            dw = (g["w"] - ref["w"]).abs().max().item()
            rel = max(dh / ref["h"].abs().max().item(), dw / ref["w"].abs().max().item())
            pc, tc = statistics.median(r["peaks"]), statistics.median(r["times"])
            print(f"| {_name(v)} | {pc / 2**20:.0f} | 1/{pn / max(pc, 1):.1f} | {tc:.2f} | {tc / tn:.2f}x "
                  f"| {dh:.2e} / {dw:.2e} (relative to the largest gradient: {rel:.1e}) |")
    for r in results.values():
        os.remove(r["grads"])
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
