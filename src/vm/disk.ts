// The read-only disk of a guest (vm.disk): a container image's root file
// system, shared by every VM of this vmcgi.
//
// It is opened once, when vmcgi starts, and held open for as long as it runs.
// Every QEMU is given a descriptor of its own on that very file (reopened
// through /proc/self/fd on Linux), never the path: a new version of the image
// written to the same path, or a file planted there, reaches no VM of this
// vmcgi. That matters most in clone mode, where the template's page cache
// holds blocks of the disk it booted from, and a clone must read the same.

import { closeSync, constants, fstatSync, openSync } from 'node:fs'
import { ConfigError, VmcgiError } from '../errors.js'

export class HeldDisk {
  readonly path: string
  /** dev, inode, size and mtime of the held file: part of the clone template's key. */
  readonly identity: string
  #fd: number | undefined

  constructor(path: string) {
    this.path = path
    let fd: number
    try {
      fd = openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW)
    } catch (error) {
      throw new ConfigError('vm.disk', `cannot open ${path}: ${(error as NodeJS.ErrnoException).code}`)
    }
    const stat = fstatSync(fd)
    if (!stat.isFile()) {
      closeSync(fd)
      throw new ConfigError('vm.disk', `not a regular file: ${path}`)
    }
    this.#fd = fd
    this.identity = `${stat.dev}:${stat.ino}:${stat.size}:${stat.mtimeMs}`
  }

  /** A new read-only descriptor on the held file, for one QEMU to inherit; the caller closes it. */
  reopen(): number {
    if (this.#fd === undefined) throw new VmcgiError('INTERNAL', `the disk ${this.path} is closed`)
    try {
      return openSync(process.platform === 'linux' ? `/proc/self/fd/${this.#fd}` : this.path, constants.O_RDONLY)
    } catch (error) {
      throw new VmcgiError('SPAWN_FAILED', `the disk ${this.path} cannot be opened: ${(error as Error).message}`, { cause: error })
    }
  }

  close(): void {
    if (this.#fd !== undefined) closeSync(this.#fd)
    this.#fd = undefined
  }
}

/**
 * Where QEMU finds the disk it inherited as descriptor `fd` (3, 4, …): its own
 * /proc/self/fd/N on Linux; elsewhere the path, which is all there is.
 */
export function diskPathFor(disk: HeldDisk, fd: number): string {
  return process.platform === 'linux' ? `/proc/self/fd/${fd}` : disk.path
}
