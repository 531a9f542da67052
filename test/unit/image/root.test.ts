import { execFileSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { beforeAll, afterAll, describe, expect, it } from 'vitest'
import { readInsideRoot, resolveInsideRoot } from '../../../src/image/root.js'

describe('readInsideRoot', () => {
  let outside: string
  let root: string
  beforeAll(() => {
    outside = mkdtempSync(join(tmpdir(), 'vmcgi-root-'))
    root = join(outside, 'root')
    mkdirSync(join(root, 'etc'), { recursive: true })
    mkdirSync(join(root, 'usr/lib'), { recursive: true })
    writeFileSync(join(outside, 'secret'), 'the host\'s file')
    writeFileSync(join(root, 'secret'), 'the image\'s file')
    writeFileSync(join(root, 'usr/lib/group'), 'group of the image')
    symlinkSync('/secret', join(root, 'etc/passwd'))
    symlinkSync('../usr/lib/group', join(root, 'etc/group'))
    symlinkSync('../../../../secret', join(root, 'etc/shadow'))
    symlinkSync('loop-b', join(root, 'etc/loop-a'))
    symlinkSync('loop-a', join(root, 'etc/loop-b'))
  })
  afterAll(() => rmSync(outside, { recursive: true, force: true }))

  it('follows an absolute link from the image\'s root, not the host\'s', () => {
    expect(readInsideRoot(root, '/etc/passwd')).toBe('the image\'s file')
  })

  it('follows a relative link, and a climb past the root stays at the root', () => {
    expect(readInsideRoot(root, '/etc/group')).toBe('group of the image')
    expect(resolveInsideRoot(root, '/etc/shadow')).toBe('/secret')
    expect(readInsideRoot(root, '/etc/shadow')).toBe('the image\'s file')
  })

  it('reads no FIFO, device or folder: an image can plant them as its /etc/passwd', () => {
    execFileSync('mkfifo', [join(root, 'etc/fifo')])
    symlinkSync('/dev/zero', join(root, 'etc/zero')) // inside the root: its own (absent) /dev/zero
    expect(readInsideRoot(root, '/etc/fifo')).toBeUndefined()
    expect(readInsideRoot(root, '/etc/zero')).toBeUndefined()
    expect(readInsideRoot(root, '/etc')).toBeUndefined()
  })

  it('gives up on a missing file and on a loop of links', () => {
    expect(readInsideRoot(root, '/etc/missing')).toBeUndefined()
    expect(readInsideRoot(root, '/etc/loop-a')).toBeUndefined()
  })
})
