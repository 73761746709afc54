"""``meshctl``: the one command-line tool (the ``meshctl`` console script calls `main`).

Playground: ``up [--demo]``, ``down``, ``status``. Objects, kubectl-style: ``apply -f``,
``delete``, ``label``, ``get``, ``scale``, ``exec``, ``logs``. This module parses the command line,
dispatches, and maps errors to output in exactly one place: an expected failure prints one
``error: ...`` line and exits 1 (usage errors exit 2); nothing prints a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TextIO

from meshcore import ambient_labels, digits, envconfig
from meshcore.kube import client as kube_client
from meshcore.kube import errors as kube_errors
from meshcore.kube import resources as kube_resources
from meshcore.policy import spec as policy_spec
from meshctl import check, commands, errors, kinds, manifest, podexec, tables, waypoint
from meshctl.demo import manifests as demo_manifests
from meshctl.playground import control, paths, podstatus, procs, record

DEFAULT_NAMESPACE = "default"
DEFAULT_ROOT_NAMESPACE = policy_spec.DEFAULT_ROOT_NAMESPACE
DEMO_TIMEOUT = 120.0


# -- argument parsing -------------------------------------------------------------------------


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    state_default = env.get("MESH_STATE_DIR") or paths.DEFAULT_STATE_DIR
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        default=argparse.SUPPRESS,
        help=f"playground state directory (env MESH_STATE_DIR, default {paths.DEFAULT_STATE_DIR})",
    )
    ns = argparse.ArgumentParser(add_help=False)
    ns.add_argument("-n", "--namespace", default=None)

    parser = argparse.ArgumentParser(
        prog="meshctl", description="ambient-mesh: the local playground and its objects"
    )
    parser.add_argument("--state-dir", default=state_default, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", parents=[common], help="start the local playground")
    up.add_argument("--demo", action="store_true", help="also run the demo shop app")
    up.add_argument("--nodes", type=int, default=1)
    up.add_argument("--prefix", default="mesh", help="names of namespaces and links (default mesh)")
    up.add_argument("--no-host-access", action="store_true")
    up.add_argument(
        "--max-pods",
        type=int,
        default=podstatus.DEFAULT_MAX_PODS,
        help="pods each node admits (its kubelet's --max-pods; default 110)",
    )
    up.add_argument(
        "--otlp-endpoint",
        default="",
        metavar="URL",
        help="where waypoints export trace spans, OTLP/HTTP (e.g. http://collector.obs:4318)",
    )
    up.add_argument(
        "--redirect-mode",
        choices=envconfig.REDIRECT_MODES,
        default="iptables",
        help="how pods are captured: iptables rules (default, as Istio) or tc eBPF programs",
    )
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    up.add_argument("--log-level", default="info")

    down = sub.add_parser("down", parents=[common], help="stop the playground, remove everything")
    down.add_argument("--prefix", default=None, help="clean up by prefix when the record is lost")
    down.add_argument("--timeout", type=float, default=90.0)

    sub.add_parser("status", parents=[common], help="phase, nodes and component processes")

    apply = sub.add_parser("apply", parents=[common, ns], help="create or update from YAML")
    apply.add_argument("-f", "--filename", action="append", required=True)

    delete = sub.add_parser("delete", parents=[common, ns], help="delete objects")
    delete.add_argument("-f", "--filename", action="append")
    delete.add_argument("args", nargs="*", metavar="KIND NAME")
    delete.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True)
    delete.add_argument("--timeout", type=float, default=60.0)

    label = sub.add_parser("label", parents=[common, ns], help="set or remove labels")
    label.add_argument("kind")
    label.add_argument("name")
    label.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-")
    label.add_argument("--overwrite", action="store_true")

    get = sub.add_parser("get", parents=[common, ns], help="list or show objects")
    get.add_argument(
        "kind",
        metavar="KIND",
        help="namespaces|pods|services|nodes|deployments|authorizationpolicies|peerauthentications|workloads|vs|dr|se|gateways|httproutes|telemetries",
    )
    get.add_argument("name", nargs="?")
    get.add_argument("-A", "--all-namespaces", action="store_true")
    get.add_argument("-o", "--output", choices=["wide", "yaml", "json"], default="")

    scale = sub.add_parser("scale", parents=[common, ns], help="set a deployment's replicas")
    scale.add_argument("target", metavar="TYPE/NAME | TYPE", help="e.g. deployment/web, deploy web")
    scale.add_argument("name", nargs="?", metavar="NAME")
    scale.add_argument("--replicas", type=int, required=True, metavar="N")

    check = sub.add_parser(
        "check",
        parents=[common, ns],
        help="would a connection be allowed? (policies evaluated, no traffic sent)",
    )
    check.add_argument("source", metavar="FROM_POD")
    check.add_argument("destination", metavar="TO_POD_OR_SERVICE:PORT", help="[pod/|svc/]NAME:PORT")
    check.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE)

    ex = sub.add_parser("exec", parents=[common, ns], help="run a command inside a pod")
    ex.add_argument("pod", help="NAME, pod/NAME or deploy/NAME (one of its pods)")
    ex.add_argument("-c", "--container", default=None)

    wp = sub.add_parser("waypoint", help="deploy or remove a namespace's waypoint proxy")
    wp_sub = wp.add_subparsers(dest="waypoint_command", required=True, metavar="ACTION")
    wp_apply = wp_sub.add_parser(
        "apply", parents=[common, ns], help="create the waypoint and send the namespace through it"
    )
    wp_apply.add_argument("--name", default=waypoint.DEFAULT_NAME)
    wp_apply.add_argument(
        "--enroll-namespace",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"label the namespace {waypoint.USE_WAYPOINT_LABEL}=NAME (default: yes)",
    )
    wp_apply.add_argument(
        "--for",
        dest="waypoint_for",
        choices=ambient_labels.WAYPOINT_FOR_VALUES,
        default=ambient_labels.WAYPOINT_FOR_SERVICE,
        help="what traffic it serves: calls to service addresses (default), to pods' own IPs"
        " (workload), all or none (its istio.io/waypoint-for)",
    )
    wp_apply.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True)
    wp_apply.add_argument("--timeout", type=float, default=120.0)
    wp_delete = wp_sub.add_parser("delete", parents=[common, ns], help="remove the waypoint")
    wp_delete.add_argument("--name", default=waypoint.DEFAULT_NAME)

    logs = sub.add_parser("logs", parents=[common, ns], help="print a container's log")
    logs.add_argument("pod", help="NAME, pod/NAME or deploy/NAME (one of its pods)")
    logs.add_argument("-c", "--container", default=None)
    logs.add_argument("-f", "--follow", action="store_true")
    return parser


def split_exec_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Everything after the first ``--`` is the command to run in the pod."""
    args = list(argv)
    if "--" not in args:
        return args, []
    i = args.index("--")
    return args[:i], args[i + 1 :]


# -- helpers ----------------------------------------------------------------------------------


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise errors.MeshctlError(
            f"`meshctl {what}` must run as root: it creates network namespaces, links and"
            " iptables rules (try: sudo meshctl " + what + ")"
        )


def api_address(state_dir: str) -> str:
    sock = paths.Paths(state_dir).api_socket
    if not os.path.exists(sock):
        raise errors.NotRunningError(
            f"no playground is running in {state_dir} (no API socket at {sock}); start one with"
            " `meshctl up`"
        )
    return f"unix://{sock}"


def run_with_api(state_dir: str, body: Callable[[kube_client.ApiClient], Awaitable[int]]) -> int:
    async def go() -> int:
        api = kube_client.ApiClient(api_address(state_dir))
        try:
            return await body(api)
        finally:
            await api.close()

    return asyncio.run(go())


# -- playground commands ----------------------------------------------------------------------


def cmd_up(args: argparse.Namespace, io: commands.Streams, env: Mapping[str, str]) -> int:
    require_root("up")
    if args.nodes < 1:
        raise errors.UsageError("--nodes must be at least 1")
    opts = control.UpOptions(
        state_dir=os.path.abspath(args.state_dir),
        nodes=args.nodes,
        prefix=args.prefix,
        host_access=not args.no_host_access,
        max_pods=args.max_pods,
        otlp_endpoint=args.otlp_endpoint,
        redirect_mode=args.redirect_mode,
        timeout=args.timeout,
        log_level=args.log_level,
    )
    proc = control.launch_supervisor(opts, dict(env))
    print(
        f"Starting the playground {opts.prefix!r} ({opts.nodes} node(s)); state in"
        f" {opts.state_dir}, supervisor pid {proc.pid}",
        file=io.out,
    )

    def show(text: str) -> None:
        print(f"  - {text}", file=io.out, flush=True)

    try:
        rec = control.wait_until_ready(opts.state_dir, proc, opts.timeout, show)
    except control.StartFailedError as exc:
        print(f"error: {exc}", file=io.err)
        if exc.log_tail:
            print(f"--- last lines of {exc.log_path}:\n{exc.log_tail}\n---", file=io.err)
        print("Cleaning up...", file=io.err)
        control.interrupt_supervisor(proc)
        control.stop_playground(opts.state_dir, opts.prefix)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted; stopping the playground...", file=io.err)
        control.stop_playground(opts.state_dir, opts.prefix)
        return 130
    topo = rec.topology
    for node in topo.nodes if topo else ():
        print(f"Node {node.name}: {node.address} (netns {node.netns})", file=io.out)
    print("The playground is ready.", file=io.out)
    if args.demo:
        return start_demo(opts.state_dir, rec, io)
    return 0


def start_demo(state_dir: str, rec: record.PlaygroundRecord, io: commands.Streams) -> int:
    text = demo_manifests.build_demo_manifest()

    async def body(api: kube_client.ApiClient) -> int:
        items = await commands.load_manifests(api, [(text, "demo")], None)
        code = await commands.apply(api, items, io)
        print("Waiting for the demo deployments and pods to be Ready...", file=io.out, flush=True)
        deadline = time.monotonic() + DEMO_TIMEOUT
        await commands.wait_deployments_ready(
            api, demo_manifests.NAMESPACE, demo_manifests.DEPLOYMENTS, DEMO_TIMEOUT
        )
        await commands.wait_pods_ready(
            api,
            demo_manifests.NAMESPACE,
            (demo_manifests.CLIENT,),
            max(deadline - time.monotonic(), 0.0),
        )
        return code

    code = run_with_api(state_dir, body)
    node = rec.topology.nodes[0] if rec.topology and rec.topology.nodes else None
    host = rec.topology is not None and rec.topology.host_link is not None
    metrics = (
        f"curl -s http://{node.address}:15020/metrics | grep istio_tcp"
        if node and host
        else f"ip netns exec {node.netns if node else '<node netns>'} curl -s"
        f" http://{node.address if node else '<node address>'}:15020/metrics"
    )
    print(
        f"""
The demo shop runs in namespace "{demo_manifests.NAMESPACE}", outside the mesh for now. Next:

  meshctl get deployments -n shop
  meshctl get pods -n shop -o wide
  meshctl exec -n shop client -- curl -s http://product-catalog.shop/products
  meshctl label namespace shop istio.io/dataplane-mode=ambient
  meshctl get workloads
  meshctl exec -n shop client -- curl -s http://order-management.shop/orders
  {metrics}
  meshctl down
""",
        file=io.out,
    )
    return code


def cmd_down(args: argparse.Namespace, io: commands.Streams) -> int:
    require_root("down")
    state_dir = os.path.abspath(args.state_dir)
    rec = record.RecordFile(state_dir).load()
    if rec is None and args.prefix is None:
        print(f"No playground is running (nothing recorded in {state_dir}).", file=io.out)
        return 0
    print("Stopping the playground...", file=io.out, flush=True)
    report = control.stop_playground(state_dir, args.prefix, timeout=args.timeout)
    print(
        f"Stopped playground {report.prefix!r}: removed {len(report.netns)} network"
        f" namespace(s) and {len(report.links)} host link(s); stopped"
        f" {len(report.processes) + int(report.stopped_supervisor)} process(es).",
        file=io.out,
    )
    if not report.is_clean:
        raise errors.MeshctlError(f"these are still there after teardown: {report.leftovers}")
    print(
        f"Verified: no network namespace, link or process of {report.prefix!r} remains.",
        file=io.out,
    )
    return 0


def cmd_status(args: argparse.Namespace, io: commands.Streams) -> int:
    state_dir = os.path.abspath(args.state_dir)
    rec = record.RecordFile(state_dir).load()
    if rec is None:
        raise errors.NotRunningError(f"no playground is running (nothing recorded in {state_dir})")
    sup = rec.supervisor
    alive = control.is_supervisor_alive(rec)
    print(f"Playground {rec.prefix!r}: {rec.phase} (state dir {state_dir})", file=io.out)
    if sup is not None:
        print(f"Supervisor: pid {sup.pid} ({'running' if alive else 'gone'})", file=io.out)
    if rec.error:
        print(f"Error: {rec.error}", file=io.out)
    topo = rec.topology
    if topo is not None:
        if topo.host_link:
            print(f"Host access: {topo.host_link} {topo.host_address}", file=io.out)
        rows = [[n.name, n.address, n.netns, n.pod_cidr] for n in topo.nodes]
        io.out.write(tables.render_table(["NODE", "ADDRESS", "NETNS", "POD-CIDR"], rows))
    if rec.processes:
        prows = [
            [
                p.name,
                p.node or "-",
                str(p.pid),
                "running" if procs.is_record_alive(p) else "exited",
                str(p.restarts),
                p.log,
            ]
            for p in rec.processes
        ]
        io.out.write(
            tables.render_table(["COMPONENT", "NODE", "PID", "STATUS", "RESTARTS", "LOG"], prows)
        )
    return 0 if alive and rec.phase == record.PHASE_READY else 1


# -- object commands --------------------------------------------------------------------------


def _namespace(args: argparse.Namespace) -> str:
    return args.namespace or DEFAULT_NAMESPACE


def cmd_apply(args: argparse.Namespace, io: commands.Streams, stdin: TextIO) -> int:
    sources = [commands.read_source(f, stdin) for f in args.filename]

    async def body(api: kube_client.ApiClient) -> int:
        items = await commands.load_manifests(api, sources, args.namespace)
        if not items:  # kubectl's words, for all the -f files together
            raise errors.ManifestError("no objects passed to apply")
        return await commands.apply(api, items, io)

    return run_with_api(args.state_dir, body)


def cmd_delete(args: argparse.Namespace, io: commands.Streams, stdin: TextIO) -> int:
    if args.filename and args.args:
        raise errors.UsageError("give either -f FILE or KIND NAME..., not both")
    if not args.filename and len(args.args) < 2:
        raise errors.UsageError("usage: meshctl delete -f FILE | KIND NAME... [-n NAMESPACE]")
    sources = [commands.read_source(f, stdin) for f in args.filename or ()]

    async def body(api: kube_client.ApiClient) -> int:
        if sources:
            items = await commands.load_manifests(api, sources, args.namespace)
            return await commands.delete_items(api, items, io, wait=args.wait, timeout=args.timeout)
        return await commands.delete_named(
            api,
            args.args[0],
            args.args[1:],
            _namespace(args),
            io,
            wait=args.wait,
            timeout=args.timeout,
        )

    return run_with_api(args.state_dir, body)


def cmd_label(args: argparse.Namespace, io: commands.Streams) -> int:
    async def body(api: kube_client.ApiClient) -> int:
        return await commands.label(
            api, args.kind, args.name, _namespace(args), args.labels, io, overwrite=args.overwrite
        )

    return run_with_api(args.state_dir, body)


def build_ztunnel_states(
    processes: Iterable[record.ProcessRecord], is_alive: Callable[[record.ProcessRecord], bool]
) -> dict[str, str]:
    """Node name -> state of its ztunnel process, for the ZTUNNEL column of `get nodes`."""
    return {
        p.node: tables.PROCESS_RUNNING if is_alive(p) else tables.PROCESS_EXITED
        for p in processes
        if p.name == "ztunnel" and p.node
    }


def find_ztunnel_states(state_dir: str) -> dict[str, str]:
    """From the playground record; empty (every node shows "-") when it cannot be read: the
    node list must not fail because of the record."""
    try:
        rec = record.RecordFile(state_dir).load()
    except record.RecordError:
        return {}
    return {} if rec is None else build_ztunnel_states(rec.processes, procs.is_record_alive)


def cmd_get(args: argparse.Namespace, io: commands.Streams) -> int:
    async def body(api: kube_client.ApiClient) -> int:
        is_nodes = not kinds.is_workloads(args.kind) and (
            kinds.find_resource(args.kind) == kube_resources.NODES
        )
        return await commands.get(
            api,
            args.kind,
            args.name,
            _namespace(args),
            io,
            all_namespaces=args.all_namespaces,
            output=args.output,
            explicit_namespace=args.namespace is not None,
            ztunnel_states=find_ztunnel_states(args.state_dir) if is_nodes else None,
        )

    return run_with_api(args.state_dir, body)


def cmd_scale(args: argparse.Namespace, io: commands.Streams) -> int:
    # The arguments are checked before the playground is asked anything.
    kind, name = kinds.split_ref([args.target, *([args.name] if args.name else [])])
    rtype = kinds.find_scalable(kind)
    commands.check_replicas(args.replicas)

    async def body(api: kube_client.ApiClient) -> int:
        return await commands.scale(api, rtype, name, _namespace(args), args.replicas, io)

    return run_with_api(args.state_dir, body)


def parse_destination(text: str) -> tuple[str | None, str, int]:
    """``[pod/|svc/]NAME:PORT`` -> (kind or None, name, port)."""
    ref, sep, port_text = text.rpartition(":")
    if not sep or not ref or not digits.is_digits(port_text) or not 0 < int(port_text) < 65536:
        raise errors.UsageError(
            f"destination {text!r} must be NAME:PORT (a pod or service, e.g. server:8080)"
        )
    kind, slash, name = ref.partition("/")
    if not slash:
        return None, ref, int(port_text)
    if kind in ("pod", "pods", "po"):
        return "pod", name, int(port_text)
    if kind in ("svc", "service", "services"):
        return "service", name, int(port_text)
    raise errors.UsageError(f"destination kind {kind!r}: use pod/NAME or svc/NAME")


def cmd_check(args: argparse.Namespace, io: commands.Streams) -> int:
    kind, name, port = parse_destination(args.destination)
    namespace = _namespace(args)

    async def body(api: kube_client.ApiClient) -> int:
        source = await commands.find_pod(api, args.source, namespace)
        policies = check.build_policies(
            (await api.list(kinds.AUTHORIZATION_POLICIES)).items,
            (await api.list(kinds.PEER_AUTHENTICATIONS)).items,
            root_namespace=args.root_namespace,
        )
        destinations = await commands.find_check_targets(api, kind, name, namespace, port)
        verdicts = [check.check_pod(policies, source, pod, p) for pod, p in destinations]
        label = f"{namespace}/{source['metadata']['name']}"
        io.out.write(check.render(label, verdicts, policies.skipped))
        return 0 if all(v.allowed for v in verdicts) else 1

    return run_with_api(args.state_dir, body)


def cmd_exec(args: argparse.Namespace, command: list[str], io: commands.Streams) -> int:
    if not command:
        raise errors.UsageError("you must specify the command after --: meshctl exec POD -- CMD")
    require_root("exec")
    state_dir = args.state_dir

    async def body(api: kube_client.ApiClient) -> int:
        pod = await commands.find_pod(api, args.pod, _namespace(args))
        container = podexec.pick_container(pod, args.container)
        return podexec.find_container_pid(state_dir, pod, container)

    pid = run_with_api(state_dir, body)
    # Entered from this (single-threaded) process after the event loop is gone.
    return podexec.exec_in_container(pid, command)


def cmd_logs(args: argparse.Namespace, io: commands.Streams) -> int:
    state_dir = args.state_dir
    namespace = _namespace(args)

    async def body(api: kube_client.ApiClient) -> int:
        pod = await commands.find_pod(api, args.pod, namespace)
        container = podexec.pick_container(pod, args.container)
        path = podexec.log_path(state_dir, pod, container)
        uid = pod["metadata"]["uid"]
        pod_name = pod["metadata"]["name"]  # followed even when args.pod was deploy/NAME

        async def still_there() -> bool:
            try:
                current = await commands.find_pod(api, pod_name, namespace)
            except kube_errors.NotFoundError:
                return False
            return bool(current["metadata"]["uid"] == uid)

        await commands.follow_log(path, io, still_there, follow=args.follow)
        return 0

    return run_with_api(state_dir, body)


def cmd_waypoint(args: argparse.Namespace, io: commands.Streams) -> int:
    namespace = _namespace(args)

    async def body(api: kube_client.ApiClient) -> int:
        if args.waypoint_command == "delete":
            return await waypoint.delete(api, namespace, args.name, io)
        return await waypoint.apply(
            api,
            namespace,
            args.name,
            io,
            enroll_namespace=args.enroll_namespace,
            wait=args.wait,
            timeout=args.timeout,
            waypoint_for=args.waypoint_for,
        )

    return run_with_api(args.state_dir, body)


# -- entry point ------------------------------------------------------------------------------


def run(
    argv: Sequence[str],
    env: Mapping[str, str],
    out: TextIO,
    err: TextIO,
    stdin: TextIO,
) -> int:
    """The whole CLI; returns the exit code (testable without a process)."""
    io = commands.Streams(out, err)
    parser = build_parser(env)
    front, command = split_exec_command(argv)
    try:
        args = parser.parse_args(front)
        if command and args.command != "exec":
            # "--" belongs to the arguments of some other command: parse them whole.
            args, command = parser.parse_args(list(argv)), []
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        if args.command == "up":
            return cmd_up(args, io, env)
        if args.command == "down":
            return cmd_down(args, io)
        if args.command == "status":
            return cmd_status(args, io)
        if args.command == "apply":
            return cmd_apply(args, io, stdin)
        if args.command == "delete":
            return cmd_delete(args, io, stdin)
        if args.command == "label":
            return cmd_label(args, io)
        if args.command == "get":
            return cmd_get(args, io)
        if args.command == "scale":
            return cmd_scale(args, io)
        if args.command == "exec":
            return cmd_exec(args, command, io)
        if args.command == "check":
            return cmd_check(args, io)
        if args.command == "logs":
            return cmd_logs(args, io)
        if args.command == "waypoint":
            return cmd_waypoint(args, io)
        raise errors.UsageError(f"unknown command {args.command!r}")
    except errors.UsageError as exc:
        print(f"error: {exc}", file=err)
        return 2
    except errors.MeshctlError as exc:
        print(f"error: {exc}", file=err)
        return 1
    except kube_errors.ApiError as exc:
        print(manifest.format_server_error(exc), file=err)
        return 1
    except kube_errors.KubeError as exc:
        print(f"error: {exc}", file=err)
        return 1
    except OSError as exc:
        print(f"error: {exc.strerror or exc}", file=err)
        return 1
    except KeyboardInterrupt:
        return 130


def main() -> int:
    return run(sys.argv[1:], os.environ, sys.stdout, sys.stderr, sys.stdin)
