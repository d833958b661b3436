"""The ``pdserve`` command: serve, generate, info, demo, bench, profile, tune."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import sys
import threading
from collections.abc import Sequence

import grpc

from pdserve.cluster.autoscale_config import AUTOSCALE_GROUP
from pdserve.cluster.bench.flags import add_workload_flags
from pdserve.cluster.client_flags import add_client_flags, client_auth
from pdserve.cluster.config import FLAG_GROUPS, SECTIONS, ServeConfig
from pdserve.cluster.knobs import add_flags, given_flags
from pdserve.cluster.security_config import SECURITY_GROUP
from pdserve.cluster.tune import cli as tune_parser
from pdserve.engine.config import PRESETS, ModelSpec
from pdserve.proto.credentials import ClientAuth

# Where `generate`, `info` and `bench` find a server started with the defaults.
DEFAULT_SERVER = f"{ServeConfig.host}:{ServeConfig.port}"


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (overrides the config file)")
    g.add_argument("--model", metavar="PATH",
                   help="a GGUF file or an HF folder (default: the embedded SmolLM2-135M)")
    g.add_argument("--load-format", choices=("gguf", "hf", "dummy"),
                   help="how to read --model (default: gguf for a file, hf for a folder)")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="model shape with seeded random weights (implies --load-format dummy; "
                        "not with --model)")


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    """--config, --address, a flag for every ServeConfig knob (``cluster.knobs``), and the
    model flags."""
    p.add_argument("--config", metavar="FILE",
                   help="YAML ServeConfig (see deploy/): keys are the flags' names with "
                        "underscores; flags override the file")
    p.add_argument("--address", metavar="RAY_ADDRESS",
                   help="join this Ray cluster (default: start a local Ray instance)")
    add_flags(p, ServeConfig, FLAG_GROUPS)
    add_flags(p, SECTIONS["autoscaling"], AUTOSCALE_GROUP)
    add_flags(p, SECTIONS["security"], SECURITY_GROUP)
    _add_model_flags(p)


# The serve knobs that decide what `pdserve profile` measures: the decode worker's runner.
PROFILE_KNOBS = ("device", "dtype", "backend", "torch_threads", "enforce_eager",
                 "cuda_graph_max_batch", "gpu_memory_utilization", "block_size",
                 "decode_blocks", "max_batch_tokens", "max_num_seqs", "max_context")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """ServeConfig from --config plus the knobs given as flags. --preset means dummy
    weights; with --model or another --load-format it raises ValueError."""
    cfg = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    over = given_flags(args, ServeConfig)
    for name, kind in SECTIONS.items():
        if section := given_flags(args, kind):
            over[name] = dataclasses.replace(getattr(cfg, name), **section)
    if args.preset:
        if args.model:
            raise ValueError("--preset (a shape with dummy weights) and --model exclude "
                             "each other")
        if args.load_format not in (None, "dummy"):
            raise ValueError(f"--preset means --load-format dummy, not --load-format "
                             f"{args.load_format}")
        over["model"] = ModelSpec(source="dummy", preset=args.preset)
    elif args.model or args.load_format:
        fmt = args.load_format or ("hf" if args.model and not args.model.endswith(".gguf")
                                   else "gguf")
        over["model"] = ModelSpec(source=fmt, path=args.model)
    return dataclasses.replace(cfg, **over)


def _serve_config_or_exit(args: argparse.Namespace) -> ServeConfig:
    """serve_config, or exit 2 with its error (a bad flag or config value)."""
    try:
        return serve_config(args)
    except ValueError as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from pdserve.cluster.launch import launch

    cfg = _serve_config_or_exit(args)
    pools = (f"{cfg.num_decode} colocated replicas" if cfg.colocated
             else f"{cfg.num_prefill} prefill + {cfg.num_decode} decode workers")
    rule = cfg.local_prefill
    local: list[str] = []
    if rule.local_prefill_max_tokens:
        local.append(f"prompts of <= {rule.local_prefill_max_tokens} tokens")
    if rule.prefill_queue_max_tokens:
        local.append(f"every prompt while the prefill worker has > "
                     f"{rule.prefill_queue_max_tokens} tokens queued")
    if local:  # conditional disaggregation
        pools += f"; decode workers prefill {', and '.join(local)}"
    print(f"pdserve: starting {pools}", file=sys.stderr)
    dep = launch(cfg, args.address)
    http = f", the OpenAI API on {cfg.host}:{cfg.http_port}/v1" if cfg.http_port else ""
    print(f"pdserve: serving on {dep.address} (gRPC){http}, metrics on "
          f"http://{cfg.metrics_host}:{dep.metrics_port}/metrics; Ctrl-C stops",
          file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from pdserve.cluster.scaling import Autoscaler, keeper

    a = cfg.autoscaling
    if a.autoscale:
        print(f"pdserve: autoscaling prefill {a.min_prefill}-{a.max_prefill}, decode "
              f"{a.min_decode}-{a.max_decode} workers", file=sys.stderr)
    else:  # the same loop holds the pools at their sizes: a worker that dies is replaced
        a = keeper(cfg)
    scaler = threading.Thread(target=Autoscaler.for_deployment(dep, a).run, args=(stop,),
                              name="autoscaler", daemon=True)
    scaler.start()
    stop.wait()
    print("pdserve: shutting down", file=sys.stderr)
    scaler.join()
    dep.stop()
    return 0


def _client_auth_or_exit(args: argparse.Namespace) -> ClientAuth | None:
    try:
        return client_auth(args)
    except (OSError, ValueError) as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_generate(args: argparse.Namespace) -> int:
    from pdserve.proto.client import Client

    with Client(args.server, auth=_client_auth_or_exit(args)) as client:
        kwargs = dict(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()),
            timeout=args.timeout,
        )
        try:
            if args.chat:
                stream = client.generate(messages=[("user", args.prompt)], **kwargs)
            else:
                stream = client.generate(text=args.prompt, **kwargs)
            last = None
            for resp in stream:
                sys.stdout.write(resp.text)
                sys.stdout.flush()
                last = resp
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        print()
        if last is not None and args.verbose:
            t = last.timing
            print(f"[{last.finish_reason}] {last.usage.completion_tokens} tokens, "
                  f"TTFT {t.ttft_s * 1e3:.1f} ms, TPOT {t.mean_tpot_s * 1e3:.1f} ms",
                  file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from pdserve.proto.client import Client

    with Client(args.server, auth=_client_auth_or_exit(args)) as client:
        print(client.model_info())
        print(client.server_info())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pdserve.cluster.demo import run_demo

    return run_demo(_serve_config_or_exit(args), args.max_tokens)


# `pdserve bench` flags that steady-state windows replaced, and what to use instead.
REPLACED_BENCH_FLAGS = {
    "--num-prompts": "each rate sends max(--min-requests, ceil(rate * window)) requests "
                     "(--min-requests N, with --smoke below 500)",
    "--max-duration-s": "windows are at least --min-duration-s (60) and --duration-factor "
                        "(10) x the previous median E2E; --smoke allows shorter",
}


def cmd_bench(args: argparse.Namespace) -> int:
    """`pdserve bench`: a load test of a running server, `bench plot` of saved results, or
    `bench compare` of two saved results."""
    from pdserve.cluster.bench.classes import parse_class_mix
    from pdserve.cluster.bench.config import BenchConfig
    from pdserve.cluster.bench.data import DatasetError
    from pdserve.cluster.bench.plot import load_results, plot_results
    from pdserve.cluster.bench.records import Slo
    from pdserve.cluster.bench.serve import parse_rates, run_bench

    if args.bench_command == "compare":
        from pdserve.cluster.bench.compare import compare_results

        try:
            print(compare_results(*load_results([args.a, args.b])))
        except ValueError as e:
            print(f"pdserve bench compare: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.bench_command == "plot" or args.plot_from:
        plot = args.bench_command == "plot"
        out = args.out if plot else args.plot_dir
        try:
            if not out:
                raise ValueError("--plot-from needs --plot-dir")
            results = load_results(args.results if plot else args.plot_from)
        except ValueError as e:
            print(f"pdserve bench: error: {e}", file=sys.stderr)
            return 2
        for png in plot_results(results, out, args.rate if plot else args.plot_rate,
                                args.attainment_target):
            print(png)
        return 0
    for old, new in REPLACED_BENCH_FLAGS.items():
        if getattr(args, old.lstrip("-").replace("-", "_")) is not None:
            args.usage_error(f"{old} was replaced: {new}")
    if args.stop_below_attainment is not None and args.slo_ttft_ms is None \
            and args.slo_tpot_ms is None and args.slo_class is None and args.class_mix is None:
        # attainment without an objective only counts completed requests: nothing to stop on
        args.usage_error("--stop-below-attainment needs an SLO: give --slo-ttft-ms and/or "
                         "--slo-tpot-ms, or an SLO class (--slo-class, --class-mix)")
    try:
        cfg = BenchConfig(
            server=args.server, auth=_client_auth_or_exit(args), label=args.label,
            dataset=args.dataset,
            dataset_path=args.dataset_path, system_prompt_len=args.system_prompt_len,
            turns=args.turns, users=args.users,
            input_len=args.input_len, output_len=args.output_len,
            input_len_dist=args.input_len_dist, output_len_dist=args.output_len_dist,
            range_ratio=args.range_ratio, request_rates=parse_rates(args.request_rate),
            burstiness=args.burstiness, max_concurrency=args.max_concurrency, seed=args.seed,
            temperature=args.temperature, ignore_eos=args.ignore_eos,
            slo=Slo(args.slo_ttft_ms, args.slo_tpot_ms),
            goodput_attainment=args.goodput_attainment, request_timeout_s=args.timeout,
            ready_timeout_s=args.ready_timeout, result_json=args.result_json,
            plot_dir=args.plot_dir, plot_rate=args.plot_rate, progress=not args.no_progress,
            client_processes=args.client_processes,
            stop_below_attainment=args.stop_below_attainment,
            min_duration_s=args.min_duration_s, duration_factor=args.duration_factor,
            min_requests=args.min_requests, warmup_fraction=args.warmup_fraction,
            smoke=args.smoke, slo_class=args.slo_class,
            class_mix=parse_class_mix(args.class_mix) if args.class_mix is not None else (),
        )
    except ValueError as e:
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return 2
    try:
        run_bench(cfg)
    except (DatasetError, TimeoutError, ValueError) as e:  # ValueError: an unknown SLO class
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:  # GetModelInfo failed; per-request errors are in the report
        print(f"pdserve bench: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """`pdserve profile`: fit the cost model on this device and write its JSON."""
    from pdserve.cluster.bench.profile import ProfileOptions, run_profile

    try:
        cfg = serve_config(args)
    except ValueError as e:
        print(f"pdserve profile: error: {e}", file=sys.stderr)
        return 2
    run_profile(cfg, ProfileOptions(out=args.out, quick=args.quick,
                                    transfer=not args.no_transfer, command=args.command_line))
    return 0


def _fraction(s: str) -> float:
    """An argparse type: a float in (0, 1]."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def _non_negative(s: str) -> float:
    """An argparse type: a float >= 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _positive(s: str) -> float:
    """An argparse type: a float > 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="Disaggregated LLM serving: prefill and decode on separate workers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve until stopped (Ctrl-C)",
                       description="Start the router and the workers, and serve gRPC.")
    _add_serve_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="stream one answer from a running server",
                       description="Send one prompt and stream the answer to stdout.")
    p.add_argument("prompt")
    p.add_argument("--server", default=DEFAULT_SERVER, help="host:port of the server")
    add_client_flags(p)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("-v", "--verbose", action="store_true", help="print timing at the end")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="model and server info of a running server")
    p.add_argument("--server", default=DEFAULT_SERVER)
    add_client_flags(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="local cluster, a few chat prompts, a TTFT/TPOT table",
                       description="Start a local deployment, stream answers to a few chat "
                                   "prompts, print per-request timing, and stop.")
    _add_serve_flags(p)
    p.add_argument("--max-tokens", type=int, default=96)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        # no abbreviations: `bench plot ... --out` must not read as a prefix of --output-len
        "bench", allow_abbrev=False,
        help="load-test a running server: TTFT/TPOT/ITL, SLO attainment, goodput",
        description="Drive a running server over gRPC (like `vllm bench serve`): Poisson or "
                    "gamma arrivals at each --request-rate of a sweep, each long enough to "
                    "reach steady state; report latency percentiles, throughput, SLO "
                    "attainment per SLO class, a steadiness check per rate, and goodput (the "
                    "highest steady rate at which --goodput-attainment of requests meet both "
                    "SLOs). `pdserve bench plot A.json B.json --out DIR` overlays saved "
                    "results; `pdserve bench compare A.json B.json` prints their goodput "
                    "throughput per rate and class.")
    p.add_argument("--server", default=DEFAULT_SERVER, help="host:port of the server")
    add_client_flags(p)
    p.add_argument("--label", default="pdserve", help="name of this configuration in plots")
    add_workload_flags(p, REPLACED_BENCH_FLAGS)
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", default="inf", metavar="R[,R...]",
                   help="req/s (inf: all at once); a comma list runs a sweep")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps: 1 = Poisson, <1 burstier, >1 steadier")
    g.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    g.add_argument("--timeout", type=float, help="per-request deadline in seconds")
    g.add_argument("--ready-timeout", type=float, default=60.0,
                   help="seconds to wait for the server to report SERVING")
    g.add_argument("--stop-below-attainment", type=_fraction, metavar="X",
                   help="run the rates in ascending order and skip the rest after the first "
                        "whose SLO attainment is below X (needs --slo-ttft-ms/--slo-tpot-ms)")
    g = p.add_argument_group(
        "steady state", "Each rate sends max(--min-requests, ceil(rate * W)) requests, W = "
        "max(--min-duration-s, --duration-factor x the median E2E of the previous steady "
        "rate) seconds of arrivals (inf: --min-requests at once); the defaults are the least "
        "a steady-state run takes. A rate is not steady (and misses goodput) when its answers "
        "fall below 90% of its arrivals or TTFT p50 of its last third of arrivals exceeds 2x "
        "the first third's (docs: pdserve.cluster.bench.steady).")
    g.add_argument("--min-duration-s", type=_positive, default=60.0, metavar="S",
                   help="least seconds of arrivals per rate (default 60)")
    g.add_argument("--duration-factor", type=_non_negative, default=10.0, metavar="K",
                   help="and arrivals over at least K x the previous steady rate's median "
                        "E2E (default 10)")
    g.add_argument("--min-requests", type=int, default=500, metavar="N",
                   help="least requests per rate; all of them at once at inf (default 500)")
    g.add_argument("--warmup-fraction", type=float, default=0.2, metavar="F",
                   help="requests arriving in the first F of a rate's arrival window are not "
                        "counted in attainment, latency and goodput (default 0.2)")
    g.add_argument("--smoke", action="store_true",
                   help="allow windows below the defaults (a quick check of the machinery); "
                        "the report and JSON say steady_state: false")
    g = p.add_argument_group("SLOs and output")
    g.add_argument("--slo-ttft-ms", type=float,
                   help="TTFT objective (sent per request; overrides its class's)")
    g.add_argument("--slo-tpot-ms", type=float,
                   help="TPOT objective (sent per request; overrides its class's)")
    g.add_argument("--slo-class", metavar="NAME",
                   help="send every request in this SLO class of the server (default: the "
                        "server's default class); scored by its objectives (GetServerInfo)")
    g.add_argument("--class-mix", metavar="NAME=SHARE[,...]",
                   help="a seeded random SLO class per request, e.g. interactive=0.3,"
                        "batch=0.7 (shares sum to 1); the report gives each class's "
                        "attainment and goodput throughput")
    g.add_argument("--goodput-attainment", type=float, default=0.9,
                   help="fraction of requests that must meet both SLOs (DistServe: 0.9)")
    g.add_argument("--result-json", metavar="PATH",
                   help="write config, reports and per-request records")
    g.add_argument("--plot-dir", metavar="DIR", help="write PNG plots here")
    g.add_argument("--plot-rate", type=float, help="rate of the latency CDFs (default: highest)")
    g.add_argument("--plot-from", nargs="+", metavar="RESULT.json",
                   help="only plot these results into --plot-dir (no load test)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--client-processes", type=int, default=1, metavar="K",
                   help="send from K processes on one clock, for rates where one client "
                        "process would fall behind the server (default 1)")
    bsub = p.add_subparsers(dest="bench_command", metavar="{plot,compare}")
    pp = bsub.add_parser("plot", help="overlay saved results as PNG plots",
                         description="SLO attainment vs request rate, one line per result "
                                     "file (label), and TTFT/TPOT CDFs at one rate.")
    pp.add_argument("results", nargs="+", metavar="RESULT.json")
    pp.add_argument("--out", required=True, metavar="DIR")
    pp.add_argument("--rate", type=float, help="rate of the CDFs (default: highest shared)")
    pp.add_argument("--attainment-target", type=float,
                    help="the target line (default: from the first result)")
    pc = bsub.add_parser("compare", help="goodput throughput of two saved results, per rate",
                         description="Per offered rate both results ran (matched by rate): "
                                     "SLO goodput throughput of A and of B and the ratio B/A, "
                                     "per SLO class and in total (e.g. FIFO as A, SLO "
                                     "scheduling as B).")
    pc.add_argument("a", metavar="A.json")
    pc.add_argument("b", metavar="B.json")
    p.set_defaults(func=cmd_bench, attainment_target=None, usage_error=p.error)

    p = sub.add_parser(
        "profile", help="measure the router's cost model on this device (JSON profile)",
        description="Time prefill steps (prompts, chunks after a cached prefix, batches), "
                    "decode steps (batch x context) and KV transfers (the real channel "
                    "between two processes) with the serving runner, fit the cost model's "
                    "forms (a + b*tokens + c*attention; a + b*batch + c*context; latency + "
                    "bytes/bandwidth), print each fit and its error, and write the profile.")
    p.add_argument("--config", metavar="FILE",
                   help="YAML ServeConfig: the settings serve would use; flags override it")
    add_flags(p, ServeConfig, FLAG_GROUPS, only=PROFILE_KNOBS)
    _add_model_flags(p)
    g = p.add_argument_group("profile")
    g.add_argument("--out", metavar="PATH",
                   help="where the JSON goes (default: ./<device>-<model>.json)")
    g.add_argument("--quick", action="store_true",
                   help="a few points only, fewer runs each (tests, a first look)")
    g.add_argument("--no-transfer", action="store_true",
                   help="no channel measurement: a documented prior for the transfer fit")
    p.set_defaults(func=cmd_profile)

    tune_parser.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["pdserve", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
