"""Running an experiment: every configuration measured and recorded, everything torn down.

Owns the order of a run: check (``preflight``), plan, open the run folder, say
how long it will take, deploy the two nodes, shape the link, profile the
layers, walk the configurations (the link changing in place once per profile),
append every configuration's rows as soon as it is done, and tear down
whatever happens. Ctrl-C or SIGTERM stops the run, tears everything down, keeps
the results and raises ``Interrupted`` (exit 130); ``--resume`` measures only
what is missing.

It leaves *how* to the parts: ``testbed.deploy`` (nodes and teardown),
``testbed.link`` (the shaped link), ``configuration`` (measuring one
configuration), ``parts`` (the model's parts), ``placement`` (CPUs),
``progress`` (estimate and ETA), ``environment`` (what is recorded about the
host), ``testbed.analysis.results`` (files) and ``testbed.metrics`` (Prometheus).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from rich.console import Console

from testbed.analysis.results import RunFolder
from testbed.errors import ConfigError, Interrupted, TestbedError
from testbed.experiment import Experiment, load_experiment, parse_host_port, resolved_dict
from testbed.sweep import environment, placement
from testbed.sweep.configuration import KpiCache, kpis_from, loss_pct, profile_layers, run_configuration
from testbed.sweep.parts import Parts
from testbed.sweep.phases import PhaseClock
from testbed.sweep.plan import Configuration, Plan, SweepOptions, inputs, open_run, pending, plan
from testbed.sweep.progress import Timing, estimate, progress_bar
from testbed.sweep.signals import Signals

if TYPE_CHECKING:
    from testbed.deploy import Deployment
    from testbed.link.link import Link
    from testbed.link.profile import LinkProfile
    from testbed.metrics import SweepMetrics
    from testbed.metrics.exposition import MetricsServer

__all__ = ["Configuration", "Plan", "SweepOptions", "pending", "run_experiment"]


def run_experiment(path: str | Path, options: SweepOptions = SweepOptions(),
                   console: Console | None = None) -> Path:
    """Run the experiment at ``path``; returns the run folder.

    Raises:
        PreflightError: the checks ``testbed check`` makes failed (nothing was created).
        ConfigError: the experiment or a profile is wrong (nothing was started).
        ShapingError / NodeError / ProtocolError: a part failed (everything torn down).
        Interrupted: Ctrl-C or SIGTERM (everything torn down, results kept; exit 130).
    """
    from testbed.sweep.preflight import require

    console = console or Console(stderr=True)
    run: RunFolder | None = None
    try:
        with Signals(console):
            require(path, options)  # every check of `testbed check`, before anything exists
            exp = load_experiment(path)
            listen = options.metrics_listen or exp.metrics.listen
            try:
                parse_host_port(listen)
            except ValueError as e:
                raise ConfigError(str(e), field="--metrics-listen") from None
            p = plan(exp)
            run = open_run(p, options)
            _run(p, run, options, listen, console)
    except KeyboardInterrupt:
        where = f"; results so far in {run.path} (continue with: testbed run {path} --resume {run.path})" \
            if run is not None else ""
        raise Interrupted(f"interrupted; everything torn down{where}") from None
    return run.path


def _run(p: Plan, run: RunFolder, options: SweepOptions, listen: str, console: Console) -> None:
    """Estimate, deploy, sweep; everything deployed is torn down on the way out."""
    from testbed.deploy import deploy
    from testbed.link.link import Link

    exp = p.experiment
    finished = run.finished()
    kpis = kpis_from(run)
    old_seed = (run.config() or {}).get("order_seed") if options.resume is not None else None
    if old_seed is not None:
        p.seed = int(old_seed)  # a resumed run keeps its recorded order
    config = resolved_dict(exp, p.splits, model=dict(p.model), profiles=p.profiles)
    config["order_seed"] = p.seed if exp.runs.repeat > 1 else None
    run.write_config(config)
    todo = pending(p.configurations, finished)
    total = len(p.configurations)
    console.print(f"run folder: {run.path}  ({total} configurations, {total - len(todo)} already done)")
    if not todo:
        return
    cpus = placement.cpu_plan(exp)
    parallel = placement.disjoint(cpus)
    backend = options.backend or exp.nodes.backend
    estimates, source, setup = estimate(p, run, options, finished, backend if backend != "auto" else "docker",
                                        parallel)
    from testbed.sweep.estimate import Eta, human
    timing = Timing(Eta(estimates), source)
    console.print(f"estimate: about {human(setup + timing.remaining_s())} (from {source})")
    images = inputs(p)
    p.n_inputs = len(images)
    run_id, token = secrets.token_hex(3), secrets.token_urlsafe(24)

    with contextlib.ExitStack() as stack:
        stack.enter_context(placement.pinned(cpus.orchestrator))
        metrics, server = stack.enter_context(_metrics(exp, run.path.name, listen, console))
        dep = stack.enter_context(deploy(run_id, placement.node_spec(exp.nodes.local, cpus.local),
                                         placement.node_spec(exp.nodes.remote, cpus.remote),
                                         backend=backend, token=token))
        console.print(f"backend: {dep.backend}  run id: {run_id}")
        for note in cpus.notes:
            console.print(f"cpus: {note}")
        stack.callback(_publish_targets(exp, run.path.name, metrics, server, dep))
        link = Link(dep.local.shaping, dep.remote.shaping)
        stack.callback(link.teardown)
        link.check(p.profiles)
        environment.record(run, environment.environment(p, run_id, dep, link.capabilities(), options, cpus),
                           run.environment())
        nodes = placement.NodePair(dep, dep.local.client(token), dep.remote.client(token), parallel=parallel)
        for client in (nodes.local, nodes.remote):
            stack.callback(client.close)
            client.health()
        feeds = [{p.graph.inputs[0].name: a} for a in images]
        nodes.local.set_inputs(feeds)
        if exp.topology == 3:  # the source is the remote node
            nodes.remote.set_inputs(feeds)
        nodes.local.connect_peer(dep.remote.data_host, dep.remote.data_port)
        _nft_loss(stack, exp, dep, run_id, console)
        parts = Parts(p, run)
        if not options.keep_parts:
            stack.callback(parts.remove)
        profile_layers(p, nodes, run, metrics)
        timing.setup_s = time.monotonic() - timing.started
        estimates, timing.source, _ = estimate(p, run, options, finished, dep.backend, parallel, run.layers())
        timing.eta = Eta(estimates)
        _sweep(p, nodes, link, run, todo, total, kpis, metrics, console, options, parts, timing)
        environment.record_timing(run, timing.record())


def _nft_loss(stack: contextlib.ExitStack, exp: Experiment, dep: Deployment, run_id: str, console: Console) -> None:
    """``transport.nft_loss``: an nftables drop rule on the data interface of the node
    that sends the cut, removed when the run ends (Ctrl-C included)."""
    if not exp.transport.nft_loss:
        return
    from testbed.link.nft_loss import NftLoss

    node = dep.local if exp.topology == 1 else dep.remote
    loss = NftLoss(node.shaping, exp.transport.nft_loss, f"{run_id}_{node.name}".replace("-", "_"))
    stack.callback(loss.remove)
    loss.install()
    console.print(f"loss: nftables drops {loss.percent}% of packets leaving {node.name}'s {loss.dev}")


@contextlib.contextmanager
def _metrics(exp: Experiment, run_name: str, listen: str,
             console: Console) -> Iterator[tuple[SweepMetrics, MetricsServer]]:
    from prometheus_client import CollectorRegistry

    from testbed.metrics import SweepMetrics, serve

    registry = CollectorRegistry()
    m = SweepMetrics(registry, exp.name, run_name, pushgateway=exp.metrics.pushgateway)
    host, port = parse_host_port(listen)
    server = serve(registry, host, port)
    console.print(f"metrics: {server.url}")
    try:
        yield m, server
    finally:
        with contextlib.suppress(Exception):
            m.finished()
        server.close()


def _publish_targets(exp: Experiment, run_name: str, metrics: SweepMetrics, server: MetricsServer,
                     dep: Deployment) -> Callable[[], None]:
    """Tell a ``testbed monitor`` Prometheus (if any) what to scrape; returns the undo."""
    from testbed.metrics.monitor import publish_targets, remove_targets

    agents = {n.name: f"{n.metrics_host}:{n.metrics_port}" for n in (dep.local, dep.remote)}
    try:
        local = "127.0.0.1" if server.host in ("0.0.0.0", "", "::") else server.host
        path = publish_targets(run_name, exp.name, f"{local}:{server.port}", agents)
    except OSError:
        return lambda: None  # no monitor folder to write to: nothing scrapes this run

    def undo() -> None:
        # A short run ends between two scrapes: record the end and let one more
        # scrape happen, or the last configuration never reaches Prometheus.
        metrics.finished()
        server.wait_for_scrape()
        remove_targets(path)

    return undo


def _link_changed(link: Link, prof: LinkProfile, metrics: SweepMetrics) -> None:
    link.apply(prof)
    for direction in ("uplink", "downlink"):
        d = getattr(prof, direction)
        metrics.set_link(direction, prof.name, d.rate_bps if d else None, d.delay_s if d else None, loss_pct(d),
                         jitter_s=d.jitter_s if d else None, emulation=link.emulation[direction])


def _sweep(p: Plan, nodes: placement.NodePair, link: Link, run: RunFolder, todo: list[Configuration],
           total: int, kpis: KpiCache, metrics: SweepMetrics, console: Console, options: SweepOptions,
           parts: Parts, timing: Timing) -> None:
    done = total - len(todo)
    current_profile = None
    repeats = p.experiment.runs.repeat
    with progress_bar(console, options.progress) as bar:
        task = bar.add_task("starting", total=total, completed=done, eta=timing.human_remaining())
        metrics.set_progress(done, total)
        start = time.monotonic()
        for c in todo:
            prof, k = c.profile, c.split
            # Each configuration's clock starts where the previous one's ended, so
            # the sweep's whole time is accounted for, between configurations too.
            clock = PhaseClock(start)
            if prof is not current_profile:
                with clock("link"):
                    _link_changed(link, prof, metrics)
                current_profile = prof
            where = f"repeat {c.repeat + 1}/{repeats}  " if repeats > 1 else ""
            bar.update(task, description=f"{where}{prof.name}  k={k}")
            metrics.configuration_started(k, prof.name, total=total, done=done, eta_s=timing.remaining_s())
            result = run_configuration(p, nodes, link, c, kpis, metrics, clock, parts)
            with clock("write"):
                run.write_rows(result)
            result.summary.update(clock.close())
            run.commit(result)
            metrics.add_phases(prof.name, clock.seconds)
            timing.eta.finished(c.key, clock.seconds)
            start = time.monotonic()
            done += 1
            bar.update(task, completed=done, eta=timing.human_remaining())
            try:
                metrics.configuration_done(k, prof.name, done=done, eta_s=timing.remaining_s())
            except TestbedError as e:  # a Pushgateway that is down must not stop a measurement
                console.print(f"[yellow]warning:[/yellow] {e}")
        bar.update(task, description="done")
    console.print(f"done: {run.path}")
