// Reading a file of an unpacked image root as the guest would see it: every
// symlink on the way is resolved inside the root, as a chroot would, so that
// an image whose /etc/passwd links to /etc/shadow (or ../../..) reads its own
// files and never the host's.

import { closeSync, constants, fstatSync, lstatSync, openSync, readFileSync, readlinkSync } from 'node:fs'
import { join, posix } from 'node:path'

const maxLinks = 40
/** More than any passwd or group file; an image's "passwd" beyond it is not read. */
const maxBytes = 1 << 20

/**
 * The contents of the regular file `path` (absolute, as in the guest) inside
 * `root`, or undefined if there is none there. Anything else is not read: an
 * image can make its /etc/passwd a FIFO (the build would hang) or a device
 * node, which umoci, as root, creates for real (the build would read the
 * host's disk).
 */
export function readInsideRoot(root: string, path: string): string | undefined {
  const resolved = resolveInsideRoot(root, path)
  if (resolved === undefined) return undefined
  let fd: number
  try {
    fd = openSync(join(root, resolved), constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK)
  } catch {
    return undefined
  }
  try {
    const stat = fstatSync(fd)
    if (!stat.isFile() || stat.size > maxBytes) return undefined
    return readFileSync(fd, 'utf8')
  } finally {
    closeSync(fd)
  }
}

/** `path` with every symlink resolved against `root`; undefined if a part of it is missing. */
export function resolveInsideRoot(root: string, path: string): string | undefined {
  const pending = path.split('/').filter(Boolean)
  const done: string[] = []
  let links = 0
  while (pending.length > 0) {
    const part = pending.shift()!
    if (part === '.') continue
    if (part === '..') {
      done.pop() // at the root, ".." is the root
      continue
    }
    const here = join(root, ...done, part)
    let stat
    try {
      stat = lstatSync(here)
    } catch {
      return undefined
    }
    if (!stat.isSymbolicLink()) {
      done.push(part)
      continue
    }
    if (++links > maxLinks) return undefined
    const target = readlinkSync(here)
    // An absolute target starts again from the root; a relative one from where the link is.
    if (target.startsWith('/')) done.length = 0
    pending.unshift(...target.split('/').filter(Boolean))
  }
  return posix.join('/', ...done)
}
