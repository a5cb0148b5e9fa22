"""The files a run leaves in RUN_DIR (rank 0 only), and its console lines.

metrics.jsonl  one JSON object per epoch
model.pt       final weights (a state dict)
summary.json   final metrics, world size, steps, time, parameter checksum
test_report.json  per-class precision/recall/F1 and the confusion matrix
stopped.json   while a run is stopped by a signal: the step and the signal (gone once it finishes)
lock           locked while a run writes here (run_lock.py)
report/*.png   training curves, filters, confusion matrix (see report.py)
events.out.tfevents.*  TensorBoard (see tensorboard.py)
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from harness.atomic import remove_interrupted_writes, tensor_snapshot, torch_save_atomic, write_json_atomic, write_text_atomic
from harness.background import BackgroundWriter
from harness.checkpoint import CHECKPOINT_DIR, save_checkpoint, set_aside_checkpoints_after
from harness.data.manifest import MANIFEST_NAME
from harness.default_run_dir import forget_restart_record
from harness.errors import HarnessError
from harness.evaluate import EvalResult, class_report, format_report
from harness.run_files import PICTURES_GO, REPORT_DIR, RUN_FILES, STOPPED, SUMMARY_SCHEMA, read_metrics, read_run_json, refuse_link
from harness.run_lock import RunDirLock
from harness.tensorboard import TensorBoardLog, weight_snapshot

log = logging.getLogger("harness")



def prepare_run_dir(run_dir: Path, resuming: bool) -> tuple[Path, RunDirLock]:
    """Create RUN_DIR, or check that an existing one may be used, and lock it: no other
    run may be writing there (harness/run_lock.py).

    A fresh start in a directory that already holds a run's results would mix two runs, so
    it is refused: a finished run (summary.json), or epoch results (metrics.jsonl) beside
    checkpoints, which are there to resume from. A run killed before its first checkpoint
    leaves only TensorBoard events and perhaps its first epochs' metrics lines: a fresh
    start there is its restart (a batch script's rerun, torchrun's --max-restarts), and
    drops both (RunOutputs.keep_epochs, TensorBoard's purge); more metrics lines than such
    a run leaves are refused, not dropped. A fresh start is refused
    too where it would overwrite a model.pt or test_report.json at its end.

    The directories the run writes in are checked now, not when its first checkpoint or
    its pictures are due: a file where one belongs, or one that is read-only, failed the
    run after an epoch of training (and after its metrics line was written).
    """
    run_dir = Path(run_dir)
    refuse_links_where_the_run_writes(run_dir)
    if not resuming:
        checkpoints = any((run_dir / CHECKPOINT_DIR).glob("step-*"))  # committed ones (a write's temporary file is .step-*)
        for name, refused in (("metrics.jsonl", checkpoints), ("summary.json", True)):
            if refused and (run_dir / name).exists():
                raise HarnessError(
                    f"{run_dir}: already holds a run ({name} exists) that this one would not continue "
                    "(--resume never, another run's checkpoint, or no valid checkpoint to resume from); pick a new --run-dir"
                )
        if not checkpoints:
            refuse_more_metrics_than_a_killed_run_leaves(run_dir)
        for name in ("model.pt", "test_report.json"):  # a finished run's, left without its summary.json, or put there by hand
            if (run_dir / name).exists():
                raise HarnessError(f"{run_dir}: holds {name}, which this run would overwrite at its end; pick a new --run-dir, or move the file")
    make_run_dir(run_dir)
    check_writable(run_dir, "run directory")
    for name, holds in ((CHECKPOINT_DIR, "checkpoints"), (REPORT_DIR, "pictures")):  # made in RUN_DIR when first written to
        directory = run_dir / name
        if directory.exists() and not directory.is_dir():
            raise HarnessError(f"{directory}: is a file where the run writes its {holds}; move it, or pick a new --run-dir")
        if directory.exists():
            check_writable(directory, f"{holds} directory")
    return run_dir, RunDirLock(run_dir)  # before RunOutputs' first change there; a refused run changes nothing


def refuse_links_where_the_run_writes(run_dir: Path) -> None:
    """A run directory from someone else (or copied with its links) may hold a symbolic
    link where the run writes, and the run would change what the link names: the file its
    epochs' lines are appended to, the pictures' directory (report replaced files there),
    or a checkpoints directory in another run's directory, whose checkpoints it resumed
    from, pruned (--keep-checkpoints) and set aside. Each is refused, naming it. A
    checkpoints link elsewhere (scratch space for big checkpoints) is the run's own."""
    refuse_link(run_dir / "metrics.jsonl", "appends its epochs' lines to a file")
    refuse_link(run_dir / REPORT_DIR, PICTURES_GO)
    link = run_dir / CHECKPOINT_DIR
    owner = link.resolve().parent if link.is_symlink() else None
    # A run's other files (its lock and event file come first): any folder holding the link's target holds a `checkpoints`.
    if owner is not None and owner != run_dir.resolve() and any(any(owner.glob(name)) for name in RUN_FILES if name != f"{CHECKPOINT_DIR}/"):
        raise HarnessError(f"{link}: is a symbolic link into {owner}, another run's directory; this run would resume from, prune and "
                           "set aside that run's checkpoints: link a directory of this run's own, or pick a new --run-dir")


def refuse_more_metrics_than_a_killed_run_leaves(run_dir: Path) -> None:
    """A fresh start with no checkpoint drops metrics.jsonl's lines, as the restart of a run
    killed before its first checkpoint: that leaves the lines of its first two epochs at
    most (the first epoch's checkpoint is written in the background while the second
    trains; the second's waits for it). More is a run whose checkpoints were deleted (to
    free space, say), or a file of someone else's: refused, not emptied."""
    epochs = [entry["epoch"] for entry in read_metrics(run_dir, whole_lines_only=True)]
    if epochs not in ([], [1], [1, 2]):
        raise HarnessError(
            f"{run_dir}: its metrics.jsonl holds {len(epochs)} epoch line(s) (up to epoch {max(epochs)}) and there is no checkpoint "
            "to resume from: more than a run killed before its first checkpoint leaves, and a fresh start would drop them; "
            "pick a new --run-dir, or move the file"
        )


def check_run_dir_path(run_dir: Path) -> None:
    """A directory, or nothing yet, and not a shard set's."""
    if run_dir.exists() and not run_dir.is_dir():
        raise HarnessError(f"{run_dir}: is a file, not a directory; give --run-dir a directory (it is created if missing)")
    if (run_dir / MANIFEST_NAME).exists():  # --run-dir given the --shards value, say
        raise HarnessError(f"{run_dir}: holds a shard set ({MANIFEST_NAME}); a run's files go in a directory of their own")


def make_run_dir(run_dir: Path) -> None:
    check_run_dir_path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        # `runs` linked to a scratch filesystem that is gone or not mounted here: mkdir's
        # "File exists" would not say which.
        dangling = next((p for p in (*reversed(run_dir.parents), run_dir) if p.is_symlink() and not p.exists()), None)
        if dangling is not None:
            raise HarnessError(f"{dangling}: a symbolic link to {os.readlink(dangling)}, which does not exist; "
                               f"the run directory {run_dir} cannot be made there") from None
        raise HarnessError(f"{run_dir}: run directory is not writable ({e.strerror or e})") from None


def check_writable(directory: Path, what: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")  # a new name: nothing there is written through
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise HarnessError(f"{directory}: {what} is not writable ({e.strerror or e})") from None


def write_stop_record(run_dir: Path, step: int, signal_name: str) -> None:
    """The run stopped on a signal at `step`, its newest checkpoint's (or a fresh run's 0:
    a signal during start-up stops it before training). Under a launcher the exit status
    75 need not reach a batch script (a torchrun signalled too exits with its own), so the
    script reads this file to tell such a stop (requeue, resume) from a failure. The
    caller holds the run directory's lock."""
    write_json_atomic(Path(run_dir) / STOPPED, {"step": step, "signal": signal_name})


def write_start_up_stop_record(run_dir: Path, step: int, signal_name: str) -> None:
    """write_stop_record for a stop that comes before RunOutputs (while the shard set opens),
    under the run directory's lock as any other write there: a run started into a
    directory that another run is writing to is refused here too, as it would have been a
    moment later, and does not leave its stop record among the other run's files (a batch
    script would read it as that run's stop)."""
    run_dir = Path(run_dir)
    make_run_dir(run_dir)
    lock = RunDirLock(run_dir)
    try:
        write_stop_record(run_dir, step, signal_name)
    finally:
        lock.release()


class RunOutputs:
    def __init__(self, run_dir: Path, resumed_at: int | None, from_another_run: bool = False):
        """`resumed_at`: the step a resumed run continues from; None for a fresh start.
        `from_another_run`: that step's checkpoint is another run directory's (--resume
        PATH), so RUN_DIR starts a run and must hold none, as for a fresh start."""
        self.run_dir, self.lock = prepare_run_dir(run_dir, resuming=resumed_at is not None and not from_another_run)
        try:
            leftovers = [p for d in (self.run_dir, self.run_dir / CHECKPOINT_DIR) for p in remove_interrupted_writes(d)]
            if leftovers:
                log.info(f"removed {len(leftovers)} temporary file(s) of writes an earlier attempt did not finish: {', '.join(p.name for p in leftovers)}")
            # From another run's checkpoint, RUN_DIR's own checkpoints are none of this run's:
            # all go aside (left, --keep-checkpoints would prune them among the new ones).
            if from_another_run:
                set_aside_checkpoints_after(self.run_dir, 0, start=f"continues from another run's step {resumed_at}")
            else:
                set_aside_checkpoints_after(self.run_dir, resumed_at or 0)
            # TensorBoard hides events at or after purge_step that earlier event files hold,
            # so steps redone after a resume are not shown twice. The checkpoint a run resumes
            # from was written after its step's events, which the resumed run does not log
            # again: they stay.
            self.tensorboard = TensorBoardLog(self.run_dir, purge_step=resumed_at + 1 if resumed_at else 0)
        except BaseException:
            self.lock.release()
            raise
        # Checkpoint files and weight images are written off the training thread.
        self.background = BackgroundWriter()
        self.checkpoint_job: int | None = None  # the background writer's number of the last checkpoint

    def keep_epochs(self, completed: int) -> None:
        """Drop metrics lines of epochs after the checkpoint (they will be redone). A line is
        written before its epoch's checkpoint, so one cut short by a crash is one of those."""
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            kept = [entry for entry in read_metrics(self.run_dir, whole_lines_only=True) if entry["epoch"] <= completed] if completed else []
            text = "".join(json.dumps(entry) + "\n" for entry in kept)
            if path.read_bytes() != text.encode():  # a finished run rerun leaves its file as it is
                write_text_atomic(path, text)

    def epoch(self, metrics: dict, epochs: int, model, step: int) -> None:
        metrics_file = os.open(self.run_dir / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        with os.fdopen(metrics_file, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.tensorboard.scalars(step, {"val/loss": metrics["val_loss"], "val/accuracy": metrics["val_accuracy"]})
        weights = weight_snapshot(model)
        self.background.submit(lambda: self.tensorboard.weight_images(weights, step))
        log.info(
            f"epoch {metrics['epoch']}/{epochs}  train loss {metrics['train_loss']:.4f}  "
            f"val loss {metrics['val_loss']:.4f}  val acc {100 * metrics['val_accuracy']:.2f}%  "
            f"{metrics['epoch_seconds']:.1f} s  {metrics['train_samples_per_s']:,.0f} img/s"
        )

    def checkpoint(self, state: dict, step: int, epoch: int, keep: int, before_write=None) -> None:
        """Copy `state`'s tensors now (training goes on changing them), then serialise and
        write the copy on the background writer, once the previous checkpoint is written (so
        one at most is in flight). On a GPU the copies are queued on the device, so the
        training thread does not wait for the device-to-host copies and the pickling (on an
        H200 LeNet's checkpoints took 0.14 s of the training thread over 15 epochs, when it
        serialised them itself; the writer still takes the GIL while it pickles). On a
        2-core CPU the writer's work competes with training for the cores: a run with 13
        checkpoints was 0.02-0.06 s slower. `before_write`: test-only, called on the writer
        thread first."""
        if self.checkpoint_job is not None:
            self.background.wait(self.checkpoint_job)  # first: then one copy at most is held
        snapshot = tensor_snapshot(state)

        def write() -> None:
            if before_write:
                before_write()
            save_checkpoint(self.run_dir, snapshot, step, epoch, keep)

        self.checkpoint_job = self.background.submit(write)

    def wait_for_writes(self) -> None:
        """Until the checkpoints and images handed to the background writer are on disk."""
        self.background.wait()

    def close(self, wait: bool = True) -> None:
        """Let the background writer finish (a failed run still lands the checkpoint being
        written); `wait=False`: not (an interrupted run ends at once). Then the run
        directory is another run's to take; not while a write may go on (`wait=False`):
        the lock goes as the process ends."""
        self.background.close(wait)
        if wait:
            self.lock.release()

    def stopped(self, step: int, signal_name: str) -> None:
        write_stop_record(self.run_dir, step, signal_name)

    def finish(self, summary: dict, test: EvalResult, test_set: str, model) -> None:
        self.background.wait()  # the weight images, before the event file closes
        report = format_report(test.confusion)
        log.info(f"{test_set}: loss {test.loss:.4f}  accuracy {100 * test.accuracy:.2f}% on {test.samples} images\n{report}")
        write_json_atomic(
            self.run_dir / "test_report.json",
            {"set": test_set, "classes": class_report(test.confusion), "confusion": test.confusion.tolist()},
        )
        step = summary["steps"]
        self.tensorboard.scalars(step, {"test/loss": test.loss, "test/accuracy": test.accuracy})
        self.tensorboard.class_report(report, step)
        torch_save_atomic(model.state_dict(), self.run_dir / "model.pt")
        write_json_atomic(self.run_dir / "summary.json", summary)
        (self.run_dir / STOPPED).unlink(missing_ok=True)  # an earlier attempt's stop is over
        self.pictures(model.state_dict(), test.confusion, summary, step)
        self.tensorboard.close()
        forget_restart_record(self.run_dir)

    def pictures(self, state: dict, confusion, summary: dict, step: int) -> None:
        """The report's pictures (harness.report), as PNG files in RUN_DIR/report/ and in TensorBoard."""
        # Imported here, by the one process that draws, at the end: matplotlib takes 0.3 s to
        # import, which the other ranks, and runs that stop or fail, need not pay.
        from harness.report import render, run_figures, save_pictures

        metrics = read_metrics(self.run_dir)
        pictures = render(run_figures(metrics, state, confusion.numpy(), summary.get("before_training"), summary["config"]["loss"]))
        self.tensorboard.pictures(pictures, step)
        saved = save_pictures(pictures, self.run_dir)
        log.info(f"pictures: {', '.join(str(p) for p in saved)}")


def read_summary(run_dir: Path) -> dict | None:
    """RUN_DIR's summary.json, which a finished run writes last; None if there is none that
    reads as one (missing, unreadable, not a regular file, not strict JSON, or not of
    SUMMARY_SCHEMA's shape)."""
    try:
        return read_run_json(run_dir / "summary.json", SUMMARY_SCHEMA, "run summary")
    except HarnessError:
        return None


def setup_logging(rank: int) -> None:
    """Rank 0 prints progress; other ranks print only warnings and errors."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(message)s",
        stream=sys.stdout,
        force=True,
    )
