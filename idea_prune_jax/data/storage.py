"""Run files on local disk or in a bucket (`gs://...`): a few helpers over etils.epath.

orbax and the JAX compilation cache take `gs://` paths themselves; everything else the project
writes (metrics, report, plots, export config, tokenizer) goes through these helpers. Local
writes go through a per-host temporary name and a rename, so a reader never sees half a file; a
GCS object appears whole when its upload finishes, so there it is written in place.
"""

import hashlib
import os
import re
import shutil
import socket
import tempfile
import urllib.parse

from etils import epath


class StorageError(ValueError):
  """A path that cannot be used (no bucket, no credentials, a file where a directory should be)."""


def is_url(path) -> bool:
  return '://' in str(path)


def path(p) -> epath.Path:
  """An epath.Path; local paths made absolute (orbax needs them so)."""
  return epath.Path(p) if is_url(p) else epath.Path(os.path.abspath(p))


def join(base, *parts) -> str:
  return os.fspath(path(base).joinpath(*parts))


def _tmp_name(target: epath.Path) -> epath.Path:
  # Hosts may share a directory (NFS, gcsfuse): the host name and pid keep temporaries apart.
  return target.with_name(f'{target.name}.tmp-{socket.gethostname()}-{os.getpid()}')


def write_bytes(p, data: bytes) -> None:
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_url(p):
    target.write_bytes(data)
    return
  tmp = _tmp_name(target)
  tmp.write_bytes(data)
  os.replace(tmp, target)


def write_text(p, text: str) -> None:
  write_bytes(p, text.encode('utf-8'))


def read_bytes(p) -> bytes:
  return path(p).read_bytes()


def read_text(p) -> str:
  return path(p).read_text()


def exists(p) -> bool:
  return path(p).exists()


def files(directory) -> list[epath.Path]:
  """Every file under directory, nested ones included."""
  out = []
  for child in path(directory).iterdir():  # epath refuses '**' globs (one RPC per match on GCS)
    out.extend(files(child) if child.is_dir() else [child])
  return out


def copy_dir(src, dst, names=None, last: str = '') -> None:
  """Copies src's files (or just `names`) into dst, the file `last` last: it marks dst whole.

  A local dst is assembled under a temporary name and renamed into place; if another process
  got there first with a whole copy, that one stays. A bucket has no rename: there the `last`
  file, written after all the others, is what says the copy is complete.
  """
  src, final = path(src), path(dst)
  rel = sorted((epath.Path(n) for n in names) if names is not None else
               (f.relative_to(src) for f in files(src)), key=lambda r: r.name == last)
  staging = final if is_url(dst) else _tmp_name(final)
  same_kind = is_url(src) == is_url(dst)  # epath copies within one filesystem only
  for r in rel:
    target = staging / r
    target.parent.mkdir(parents=True, exist_ok=True)  # staging's parent is dst's: made here
    if same_kind:
      (src / r).copy(target, overwrite=True)
    else:
      target.write_bytes((src / r).read_bytes())
  if staging == final:
    return
  if final.exists() and not (final / last).exists():  # a copy that died half way
    shutil.rmtree(final)
  try:
    os.rename(staging, final)
  except OSError:  # another process on this host finished the same copy first
    shutil.rmtree(staging, ignore_errors=True)
    if not (final / last).exists():
      raise


def local_twin(url: str, kind: str) -> str:
  """A local directory standing in for `url` where a library needs local files (one per URL)."""
  key = hashlib.sha1(url.encode()).hexdigest()[:12]
  root = os.environ.get('IDEA_PRUNE_CACHE', os.path.join(tempfile.gettempdir(), 'idea_prune'))
  return os.path.join(root, f'{kind}-{key}')


def _endpoint() -> tuple[str, int, bool]:
  """(host, port, emulated) of the GCS API this process talks to."""
  emulator = os.environ.get('STORAGE_EMULATOR_HOST')
  if emulator:
    parsed = urllib.parse.urlsplit(emulator if '://' in emulator else f'http://{emulator}')
    return parsed.hostname, parsed.port or 80, True
  return 'storage.googleapis.com', 443, False


_BUCKET_NAME = re.compile(r'[a-z0-9]([a-z0-9._-]*[a-z0-9])?')


def bucket_problem(url: str) -> str:
  """Why GCS would reject the bucket of a gs:// URL ('' when it would not, or not gs://).

  Checked here because a bad name otherwise surfaces as a tensorstore error after its retries.
  """
  scheme, bucket = urllib.parse.urlsplit(str(url))[:2]
  if scheme != 'gs':
    return ''
  rule = ('bucket names are 3-63 lowercase letters, digits, dashes, underscores and dots, '
          'starting and ending with a letter or digit')
  # Dotted names may reach 222 characters, if every dot-separated part is at most 63.
  too_long = len(bucket) > (222 if '.' in bucket else 63) or any(
      len(part) > 63 for part in bucket.split('.'))
  if len(bucket) < 3 or too_long or not _BUCKET_NAME.fullmatch(bucket):
    return f'gs://{bucket} is not a valid bucket name ({rule})'
  return ''


def check_workdir(workdir: str, flag: str = '--workdir') -> None:
  """A usable run directory, or one StorageError line naming it and what to do."""
  if problem := bucket_problem(workdir):
    raise StorageError(f'{flag}={workdir}: {problem}')
  p = path(workdir)
  if not is_url(workdir):
    if p.exists() and not p.is_dir():
      raise StorageError(f'{flag}={workdir}: is a file, not a directory; pass a directory')
    try:
      p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise StorageError(f'{flag}={workdir}: cannot create it ({e.strerror or e})') from None
    return
  scheme, bucket = urllib.parse.urlsplit(workdir)[:2]
  if scheme != 'gs' or not bucket:
    raise StorageError(f'{flag}={workdir}: use a local path or gs://BUCKET/PATH')
  try:
    import gcsfs  # noqa: F401  etils.epath's gs:// backend
  except ImportError:
    raise StorageError(f'{flag}={workdir}: gs:// needs gcsfs; pip install '
                       "'idea-prune-jax[gcs]'") from None
  host, port, emulated = _endpoint()
  if not emulated:
    import google.auth  # gcsfs's dependency
    try:
      google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError as e:
      raise StorageError(f'{flag}={workdir}: no Google Cloud credentials ({str(e)[:160]}); run '
                         '`gcloud auth application-default login` or use a VM service account'
                         ) from None
  try:  # a plain connect fails in seconds; the GCS client retries for a minute first
    socket.create_connection((host, port), timeout=10).close()
  except OSError as e:
    raise StorageError(f'{flag}={workdir}: cannot reach the GCS API at {host}:{port} ({e}); '
                       'check the network (or STORAGE_EMULATOR_HOST)') from None
  if p.is_file():
    raise StorageError(f'{flag}={workdir}: is an object (a file), not a directory; pass a prefix')
  probe = p / f'.write-check-{socket.gethostname()}-{os.getpid()}'
  try:
    probe.write_bytes(b'')
    probe.unlink()
  except FileNotFoundError:
    raise StorageError(f'{flag}={workdir}: bucket gs://{bucket} does not exist; create it with '
                       f'`gcloud storage buckets create gs://{bucket}`') from None
  except (PermissionError, OSError) as e:
    raise StorageError(f'{flag}={workdir}: cannot write to gs://{bucket} '
                       f'({type(e).__name__}: {str(e).splitlines()[0][:160]}); check its '
                       'permissions for this account') from None
