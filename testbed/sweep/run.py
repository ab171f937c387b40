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

from testbed.analysis.results import ConfigurationResult, RunFolder
from testbed.errors import ConfigError, Interrupted, NodeError, ProtocolError, TestbedError
from testbed.experiment import Experiment, load_experiment, parse_host_port, resolved_dict
from testbed.sweep import environment, placement
from testbed.sweep.configuration import Deadlines, KpiCache, kpis_from, loss_pct, profile_layers, run_configuration
from testbed.sweep.estimate import Eta, human
from testbed.sweep.parts import Parts
from testbed.sweep.phases import PhaseClock
from testbed.sweep.plan import Configuration, Plan, SweepOptions, inputs, open_run, pending, plan
from testbed.sweep.progress import Timing, estimate, progress_bar
from testbed.sweep.session import FailureBudget, Session
from testbed.sweep.signals import Signals

if TYPE_CHECKING:
    from testbed.deploy import Deployment
    from testbed.link.link import Link
    from testbed.link.profile import LinkProfile
    from testbed.metrics import SweepMetrics
    from testbed.metrics.exposition import MetricsServer
    from testbed.sweep.android import PhoneHead

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
    if exp.nodes.remote_ssh:  # the remote computes on its own machine, on none of this host's CPUs
        cpus = placement.without_remote(cpus)
    parallel = placement.parallel(exp, cpus)
    backend = options.backend or exp.nodes.backend
    estimates, source, setup = estimate(p, run, options, finished, backend if backend != "auto" else "docker",
                                        parallel)
    timing = Timing(Eta(estimates), source)
    console.print(f"estimate: about {human(setup + timing.remaining_s())} (from {source})")
    images = inputs(p)
    p.n_inputs = len(images)

    with contextlib.ExitStack() as stack:
        stack.enter_context(placement.pinned(cpus.orchestrator))
        metrics, server = stack.enter_context(_metrics(exp, run.path.name, listen, console))
        session = stack.enter_context(Session(p, run, options, cpus, secrets.token_urlsafe(24), metrics, server,
                                              console, images, _publish_targets))
        parts = Parts(p, run)
        if not options.keep_parts:
            stack.callback(parts.remove)
        assert session.nodes is not None and session.dep is not None
        phone = _phone(stack, p, run, session.run_ids[0], metrics, console)
        profile_layers(p, session.nodes, run, metrics, phone)
        timing.setup_s = time.monotonic() - timing.started
        estimates, timing.source, _ = estimate(p, run, options, finished, session.dep.backend, parallel,
                                               run.layers())
        timing.eta = Eta(estimates)
        _sweep(p, session, run, todo, total, kpis, metrics, console, options, parts, timing, phone)
        environment.record_timing(run, timing.record())


def _phone(stack: contextlib.ExitStack, p: Plan, run: RunFolder, run_id: str, metrics: SweepMetrics,
           console: Console) -> PhoneHead | None:
    """With ``nodes.local.backend: android``: hold the phone for the run (its folder removed on the
    way out, whatever happens) and record it in environment.json."""
    cfg = p.experiment.nodes.android
    if cfg is None:
        return None
    from testbed.android.adb import Adb
    from testbed.android.session import phone_session
    from testbed.metrics.phone import PhoneMetrics
    from testbed.sweep.android import PhoneHead

    adb = Adb(cfg.adb_port)
    held = stack.enter_context(phone_session(adb, cfg.serial, p.experiment.resolve_path(cfg.benchmark_model),
                                             run_id=run_id, cores=cfg.cores or "all",
                                             need_bytes=2 * p.model_path.stat().st_size))
    pm = PhoneMetrics(metrics.registry, p.experiment.name, run.path.name, held.phone.serial, held.info.model or "")
    phone = PhoneHead(held, cfg, p.experiment.runs, p.graph, pm)
    pm.set_state(held.start_state)
    console.print(f"phone: {held.phone.serial} {held.info.model} ({held.info.soc}), cores {held.cores} "
                  f"(mask {held.mask or 'all'}), e2e composed with a proxy local node on this host")
    env = run.environment()
    env["android"] = phone.environment()
    run.write_environment(env)
    return phone


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


def _sweep(p: Plan, session: Session, run: RunFolder, todo: list[Configuration], total: int, kpis: KpiCache,
           metrics: SweepMetrics, console: Console, options: SweepOptions, parts: Parts, timing: Timing,
           phone: PhoneHead | None = None) -> None:
    done = total - len(todo)
    repeats = p.experiment.runs.repeat
    budget = FailureBudget()
    with progress_bar(console, options.progress) as bar:
        task = bar.add_task("starting", total=total, completed=done, eta=timing.human_remaining())
        metrics.set_progress(done, total)
        start = time.monotonic()
        for c in todo:
            prof, k = c.profile, c.split
            # Each configuration's clock starts where the previous one's ended, so
            # the sweep's whole time is accounted for, between configurations too.
            clock = PhaseClock(start)
            where = f"repeat {c.repeat + 1}/{repeats}  " if repeats > 1 else ""
            bar.update(task, description=f"{where}{prof.name}  k={k}")
            metrics.configuration_started(k, prof.name, total=total, done=done, eta_s=timing.remaining_s())
            try:
                result = _measure(p, session, c, kpis, metrics, clock, parts, timing, phone)
            except (NodeError, ProtocolError) as e:
                _failed(session, run, c, clock, e, budget, metrics, console)
                start = time.monotonic()
                continue
            except TestbedError as e:
                if phone is None or getattr(e, "serial", None) is None:
                    raise
                # The phone failed mid-configuration (unplugged, refused): mark it, keep what is done.
                run.append_failure({"repeat": c.repeat, "profile": prof.name, "split": k,
                                    "phase": clock.failed_in, "node": "phone", "cause": "phone failed",
                                    "error": " ".join(str(e).split())[:500],
                                    "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
                raise type(e)(f"{str(e).split(': ', 1)[-1]}; configuration k={k} at {prof.name} marked failed, "
                              f"results so far in {run.path} (finish with: testbed run EXPERIMENT --resume "
                              f"{run.path})", serial=e.serial) from e
            budget.ok()
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
    if budget.total:
        console.print(f"[yellow]{budget.total} configuration(s) failed (failures.csv); "
                      f"continue with --resume {run.path}[/yellow]")
    console.print(f"done: {run.path}")


def _measure(p: Plan, session: Session, c: Configuration, kpis: KpiCache, metrics: SweepMetrics,
             clock: PhaseClock, parts: Parts, timing: Timing, phone: PhoneHead | None = None) -> ConfigurationResult:
    """One configuration on the session's nodes, the link shaped as its profile says."""
    assert session.nodes is not None and session.link is not None
    if session.profile is not c.profile:
        with clock("link"):
            _link_changed(session.link, c.profile, metrics)
        session.profile = c.profile
    deadlines = Deadlines.from_estimate(timing.eta.estimates.get(c.key))
    return run_configuration(p, session.nodes, session.link, c, kpis, metrics, clock, parts, deadlines, phone)


def _failed(session: Session, run: RunFolder, c: Configuration, clock: PhaseClock, error: Exception,
            budget: FailureBudget, metrics: SweepMetrics, console: Console) -> None:
    """Record why a configuration could not be measured and bring the nodes back."""
    node, cause = session.diagnose()
    run.append_failure({"repeat": c.repeat, "profile": c.profile.name, "split": c.split,
                        "phase": clock.failed_in, "node": node, "cause": cause,
                        "error": " ".join(str(error).split())[:500], "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    metrics.configuration_failed(c.split, c.profile.name, node=node or "none")
    console.print(f"[yellow]{c.profile.name} k={c.split} failed in {clock.failed_in or 'setup'}: "
                  f"{node + ' node ' + cause if node else error}; {'redeploying' if node else 'reconnecting'}[/yellow]")
    budget.failed(f"{c.profile.name} k={c.split}: {cause if node else error}")
    session.recover(node_died=node is not None, cause=f"{node} node {cause}" if node else str(error))
