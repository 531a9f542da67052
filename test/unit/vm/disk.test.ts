import { closeSync, fstatSync, mkdtempSync, renameSync, rmSync, writeFileSync, readFileSync, symlinkSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it, onTestFinished } from 'vitest'
import { ConfigError } from '../../../src/errors.js'
import { diskPathFor, HeldDisk } from '../../../src/vm/disk.js'

function folder(): string {
  const dir = mkdtempSync(join(tmpdir(), 'vmcgi-disk-'))
  onTestFinished(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

describe('HeldDisk', () => {
  it('hands every VM the file it opened at start, even after another is put in its place', () => {
    const dir = folder()
    const path = join(dir, 'root.erofs')
    writeFileSync(path, 'version 1')
    const disk = new HeldDisk(path)
    onTestFinished(() => disk.close())
    writeFileSync(join(dir, 'new'), 'version 2')
    renameSync(join(dir, 'new'), path)
    const fd = disk.reopen()
    try {
      expect(readFileSync(fd, 'utf8')).toBe('version 1')
      expect(String(fstatSync(fd).ino)).toBe(disk.identity.split(':')[1])
    } finally {
      closeSync(fd)
    }
  })

  it('refuses a missing file, a folder and a symlink, naming vm.disk', () => {
    const dir = folder()
    writeFileSync(join(dir, 'real'), 'x')
    symlinkSync(join(dir, 'real'), join(dir, 'link'))
    for (const path of [join(dir, 'missing'), dir, join(dir, 'link')]) {
      expect(() => new HeldDisk(path)).toThrow(ConfigError)
      try {
        new HeldDisk(path)
      } catch (error) {
        expect((error as ConfigError).field).toBe('vm.disk')
      }
    }
  })

  it('is found by QEMU on its own descriptor on Linux', () => {
    const dir = folder()
    writeFileSync(join(dir, 'd'), 'x')
    const disk = new HeldDisk(join(dir, 'd'))
    onTestFinished(() => disk.close())
    expect(diskPathFor(disk, 5)).toBe(process.platform === 'linux' ? '/proc/self/fd/5' : join(dir, 'd'))
  })
})
