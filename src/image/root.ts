// Reading a file of an unpacked image root as the guest would see it: every
// symlink on the way is resolved inside the root, as a chroot would, so that
// an image whose /etc/passwd links to /etc/shadow (or ../../..) reads its own
// files and never the host's.

import { lstatSync, readFileSync, readlinkSync } from 'node:fs'
import { join, posix } from 'node:path'

const maxLinks = 40

/** The contents of `path` (absolute, as in the guest) inside `root`, or undefined if it does not exist there. */
export function readInsideRoot(root: string, path: string): string | undefined {
  const resolved = resolveInsideRoot(root, path)
  if (resolved === undefined) return undefined
  try {
    return readFileSync(join(root, resolved), 'utf8')
  } catch {
    return undefined
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
