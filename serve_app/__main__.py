"""python -m serve_app [flags]: start (or join) Ray and serve the app over HTTP until Ctrl-C.

    python -m serve_app --checkpoint sft/d20 --replicas 2 --port 8000
    python -m serve_app --reload sft/d21      # load a new checkpoint into the running app's replicas
                                              # (on the cluster at $RAY_ADDRESS, or the `ray start` one)

Flags: see `python -m serve_app --help` (serve_app/app.py).
"""
import os
import sys
import time

from ray import serve

from ray_jobs.common import init_ray
from serve_app.app import APP_NAME, build_app, parser


def main(argv=None):
    p = parser()
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--route-prefix", default="/")
    p.add_argument("--reload", metavar="CHECKPOINT", default=None,
                   help="do not deploy: load CHECKPOINT into every replica of the running app, then exit")
    args = p.parse_args(argv)
    if args.reload is not None:
        import ray
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))  # the running cluster, never a fresh one
        engine = serve.get_deployment_handle("NanochatEngine", app_name=APP_NAME)
        for info in engine.broadcast("reload", args.reload).results():
            print(f"replica {info['pid']}: {info['checkpoint']['path']} step {info['checkpoint']['step']}")
        return 0
    app = build_app(args)  # checks the checkpoint and tokenizer before Ray starts
    init_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name=APP_NAME, route_prefix=args.route_prefix)
    print(f"serving on http://{args.host}:{args.port}{args.route_prefix} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
    return 0


if __name__ == "__main__":
    from nanochat.common import one_line_errors
    with one_line_errors("serve_app"):  # a missing checkpoint or tokenizer: one line, before anything deploys
        sys.exit(main())
