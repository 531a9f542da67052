// prepareSnapshot: the template booted, reseeded and saved once, then reused; against a fake QEMU.

import { existsSync, readFileSync } from 'node:fs'
import { describe, expect, it } from 'vitest'
import { prepareSnapshot } from '../../../src/vm/snapshot.js'
import { createQemuVmFactory } from '../../../src/vm/vm.js'
import { alive, setUp } from './fake-qemu.js'

describe('prepareSnapshot', () => {
  it('saves the template once, reuses it, and its clones boot from it', async () => {
    // A relative dir is under the fake images' folder, removed when the test ends.
    const { env, log, pids } = setUp('listen=0', { vm: { snapshot: { dir: 'snapshots' } } })
    const host = { ...env, qemuVersion: 'fake' }
    const files = await prepareSnapshot(host, log)
    expect(readFileSync(files.statePath, 'utf8')).toBe('fake device state\n')
    expect(existsSync(files.ramPath)).toBe(true)
    expect(existsSync(`${files.statePath}.partial`)).toBe(false)
    expect(pids()).toHaveLength(1)
    expect(pids().filter(alive)).toEqual([])

    expect(await prepareSnapshot(host, log)).toEqual(files)
    expect(pids()).toHaveLength(1)

    const clone = createQemuVmFactory({ ...host, snapshot: files })(log)
    try {
      await clone.boot(new AbortController().signal)
      expect(await (await fetch(clone.origin)).text()).toBe('fake guest\n')
    } finally {
      await clone.destroy(new Error('the test is over'))
    }
    expect(pids().filter(alive)).toEqual([])
  })
})
