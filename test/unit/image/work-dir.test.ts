import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { execa } from 'execa'
import { describe, expect, it, onTestFinished } from 'vitest'
import { makeWorkDir, removeAbandonedWorkDirs } from '../../../src/image/work-dir.js'

describe('work folders in the image cache', () => {
  it('removes those of builds that are gone, and leaves those of running ones and anything else', async () => {
    const cache = mkdtempSync(join(tmpdir(), 'vmcgi-work-dir-'))
    onTestFinished(() => rmSync(cache, { recursive: true, force: true }))
    const child = execa('true')
    await child
    const gone = child.pid!
    const abandoned = join(cache, `tmp-${gone}-abc123`)
    mkdirSync(join(abandoned, 'rootfs', 'usr'), { recursive: true })
    const running = join(cache, 'tmp-1-def456') // PID 1 is always there
    mkdirSync(running)
    const ours = makeWorkDir(cache)
    const entry = join(cache, 'a'.repeat(64))
    mkdirSync(entry)

    expect(removeAbandonedWorkDirs(cache)).toEqual([`tmp-${gone}-abc123`])
    expect([abandoned, running, ours, entry].map((dir) => existsSync(dir))).toEqual([false, true, true, true])
  })
})
