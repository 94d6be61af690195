"""The run directory, the format every command reads or writes, at the ground floor (it imports
nothing else of switchformer).


- One writer at a time: :class:`RunLock` holds ``RUN/.lock`` (an ``flock`` on a file naming the
  writer's pid and host) from the first write to the end; a second writer fails with one line naming
  the run and the pid; a lock left by a killed writer (its ``flock`` is gone with the process) is
  taken over with a warning. Under torchrun only rank 0 takes it (the other ranks write only their
  own parts of a checkpoint, inside its temporary folder).
- Every file is written atomically (:func:`write_file_atomic`: a temporary file, synced, renamed into
  place) or append-safely (:class:`MetricsLog`: one ``write`` per record ending in a newline; a
  record cut short by a full disk is removed at once, one cut by a kill when the file is next opened).
  Files and folders get the user's umask, as every other program's do.
- What killed writers leave (temporary checkpoint folders, temporary files) is removed by the next
  writer under the lock (:func:`remove_leftovers`); a fresh ``train`` over a run that never completed
  a checkpoint starts over (:func:`start_over`). A final-named checkpoint folder (``step_*``) is
  never removed: only complete saves get such a name, so an incomplete one is damage, and
  ``--resume`` stops with one line naming it (:func:`damaged_checkpoint_error`).
- Errors about a file a command reads are :class:`RunFileError`: one line naming the file and what is
  wrong with it.
"""
