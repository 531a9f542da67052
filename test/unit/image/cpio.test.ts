import { gunzipSync } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { cpioArchive } from '../../../src/image/cpio.js'

/** Reads newc entries back: name, mode, rdev and data (the kernel's own reader boots it in the e2e tests). */
function readNewc(raw: Buffer) {
  const entries = []
  let offset = 0
  const align = (n: number) => (n + 3) & ~3
  for (;;) {
    expect(raw.subarray(offset, offset + 6).toString()).toBe('070701')
    const field = (index: number) => parseInt(raw.subarray(offset + 6 + index * 8, offset + 14 + index * 8).toString(), 16)
    const [mode, size, rdevMajor, rdevMinor, nameSize] = [field(1), field(6), field(9), field(10), field(11)]
    const name = raw.subarray(offset + 110, offset + 110 + nameSize - 1).toString()
    const dataStart = align(offset + 110 + nameSize)
    entries.push({ name, mode, rdev: [rdevMajor, rdevMinor], data: raw.subarray(dataStart, dataStart + size).toString() })
    offset = align(dataStart + size)
    if (name === 'TRAILER!!!') break
  }
  expect(offset).toBe(raw.length)
  return entries
}

describe('cpioArchive', () => {
  it('writes gzip\'d newc entries, 4-byte aligned, that read back as given, then the trailer', () => {
    const raw = gunzipSync(cpioArchive([
      { type: 'dir', path: 'dev', mode: 0o755 },
      { type: 'char', path: 'dev/console', mode: 0o600, major: 5, minor: 1 },
      { type: 'file', path: '/init', mode: 0o755, data: Buffer.from('#!/bin/sh\n') },
      { type: 'file', path: 'vmcgi/app', mode: 0o644, data: Buffer.from('uid=0\0') },
    ]))
    expect(readNewc(raw)).toEqual([
      { name: 'dev', mode: 0o040755, rdev: [0, 0], data: '' },
      { name: 'dev/console', mode: 0o020600, rdev: [5, 1], data: '' },
      { name: 'init', mode: 0o100755, rdev: [0, 0], data: '#!/bin/sh\n' },
      { name: 'vmcgi/app', mode: 0o100644, rdev: [0, 0], data: 'uid=0\0' },
      { name: 'TRAILER!!!', mode: 0, rdev: [0, 0], data: '' },
    ])
  })

  it('refuses a path that leaves the archive', () => {
    expect(() => cpioArchive([{ type: 'dir', path: '../etc', mode: 0o755 }])).toThrow(/not a path inside/)
  })
})
