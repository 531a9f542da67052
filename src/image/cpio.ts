// A gzip'd cpio archive in the kernel's "newc" format, for an image guest's
// initramfs: a handful of entries (the init, /dev/console, /vmcgi/app), made
// here rather than with a tool so that the build needs none for it. The
// format: Documentation/driver-api/early-userspace/buffer-format.rst.

import { gzipSync } from 'node:zlib'

export type CpioEntry =
  | { type: 'dir'; path: string; mode: number }
  | { type: 'file'; path: string; mode: number; data: Buffer }
  | { type: 'char'; path: string; mode: number; major: number; minor: number }

const typeBits = { dir: 0o040000, file: 0o100000, char: 0o020000 } as const

export function cpioArchive(entries: readonly CpioEntry[]): Buffer {
  const parts: Buffer[] = []
  let ino = 1
  const add = (name: string, mode: number, data: Buffer, rdev: [number, number] = [0, 0]) => {
    const nameBytes = Buffer.from(`${name}\0`)
    const fields = [
      ino++, mode, 0, 0, mode & typeBits.dir ? 2 : 1, 0, data.length, 0, 0, rdev[0], rdev[1], nameBytes.length, 0,
    ]
    const header = `070701${fields.map((field) => field.toString(16).padStart(8, '0')).join('')}`
    parts.push(Buffer.from(header), nameBytes, pad(110 + nameBytes.length), data, pad(data.length))
  }
  for (const entry of entries) {
    const name = entry.path.replace(/^\/+/, '')
    if (!name || name.split('/').includes('..')) throw new Error(`not a path inside the archive: ${entry.path}`)
    const mode = typeBits[entry.type] | (entry.mode & 0o7777)
    if (entry.type === 'file') add(name, mode, entry.data)
    else if (entry.type === 'char') add(name, mode, Buffer.alloc(0), [entry.major, entry.minor])
    else add(name, mode, Buffer.alloc(0))
  }
  ino = 0
  add('TRAILER!!!', 0, Buffer.alloc(0))
  return gzipSync(Buffer.concat(parts), { level: 9 })
}

/** Header plus name, and data, are each padded to a multiple of 4 bytes. */
function pad(length: number): Buffer {
  return Buffer.alloc((4 - (length % 4)) % 4)
}
