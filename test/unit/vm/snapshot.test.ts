// prepareSnapshot and prepareClones: the template booted, reseeded, checked and saved once, then reused; against a fake QEMU.

import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { ConfigError } from '../../../src/errors.js'
import type { HostProbe } from '../../../src/vm/host.js'
import { prepareClones, prepareSnapshot, snapshotKey } from '../../../src/vm/snapshot.js'
import { createQemuVmFactory } from '../../../src/vm/vm.js'
import { fakeConfig } from '../../helpers/fixtures.js'
import { alive, setUp } from './fake-qemu.js'

/** A fake host whose templates go to a folder under the test's own, removed when it ends; 16 MiB guests keep the checksums quick. */
function fakeHost(behaviour = 'listen=0', vm: Record<string, unknown> = {}) {
  const setup = setUp(behaviour, { vm: { memoryMiB: 16, snapshot: { dir: 'snapshots' }, ...vm } })
  const host: HostProbe = { ...setup.env, qemuVersion: 'fake' }
  const root = setup.env.config.vm.snapshot.dir
  return { ...setup, host, root, template: join(root, snapshotKey(host)) }
}

async function expectCloneAnswers(host: HostProbe, files: HostProbe['snapshot'], log: Parameters<typeof prepareSnapshot>[1]): Promise<void> {
  const clone = createQemuVmFactory({ ...host, snapshot: files })(log)
  try {
    await clone.boot(new AbortController().signal)
    expect(await (await fetch(clone.origin)).text()).toBe('fake guest\n')
  } finally {
    await clone.destroy(new Error('the test is over'))
  }
}

const messages = (lines: Array<Record<string, unknown>>, msg: string) => lines.filter((line) => line.msg === msg)

describe('prepareSnapshot', () => {
  it('saves the template once, reuses it, and its clones boot from it', async () => {
    const { host, log, pids, lines, template } = fakeHost()
    const files = await prepareSnapshot(host, log)
    expect(readFileSync(files.statePath, 'utf8')).toBe('fake device state\n')
    expect(readdirSync(template).sort()).toEqual(['in-use-by-' + process.pid, 'manifest.json', 'ram', 'state'])
    expect(pids()).toHaveLength(1)
    expect(pids().filter(alive)).toEqual([])

    await prepareSnapshot(host, log)
    expect(pids()).toHaveLength(1)
    expect(messages(lines, 'reusing the saved template')).toHaveLength(1)

    await expectCloneAnswers(host, files, log)
    expect(pids().filter(alive)).toEqual([])
  })

  it('keeps templates in a folder it makes with mode 0700, and the default one is this user\'s own', async () => {
    expect(fakeConfig().vm.snapshot.dir).toBe(join(tmpdir(), `vmcgi-${process.getuid!()}`))
    const { host, log, root, template } = fakeHost()
    await prepareSnapshot(host, log)
    expect(statSync(root).mode & 0o777).toBe(0o700)
    expect(statSync(template).mode & 0o777).toBe(0o700)
  })

  it('refuses a template folder that other users may write to, naming vm.snapshot.dir, and starts no QEMU', async () => {
    const { host, log, pids, root } = fakeHost()
    mkdirSync(root, { recursive: true })
    chmodSync(root, 0o777)
    await expect(prepareSnapshot(host, log)).rejects.toSatisfy((error) => error instanceof ConfigError && error.field === 'vm.snapshot.dir')
    expect(pids()).toEqual([])
  })

  it('refuses a template inside the folder that other users may write to', async () => {
    const { host, log, pids, template } = fakeHost()
    await prepareSnapshot(host, log)
    chmodSync(template, 0o757)
    await expect(prepareSnapshot(host, log)).rejects.toSatisfy((error) => error instanceof ConfigError && error.field === 'vm.snapshot.dir')
    expect(pids()).toHaveLength(1)
  })

  it.skipIf(process.getuid?.() !== 0)('refuses a template folder owned by another user', async () => {
    const { host, log, root } = fakeHost()
    mkdirSync(root, { recursive: true, mode: 0o700 })
    chownSync(root, 12345, 12345)
    await expect(prepareSnapshot(host, log)).rejects.toSatisfy((error) => error instanceof ConfigError && error.field === 'vm.snapshot.dir')
  })

  it('restores clones from the files it checked even after they are removed from the folder', async () => {
    const { host, log, template } = fakeHost()
    const files = await prepareSnapshot(host, log)
    rmSync(join(template, 'state'))
    rmSync(join(template, 'ram'))
    await expectCloneAnswers(host, files, log)
  })

  it.each([
    ['state overwritten', (template: string) => writeFileSync(join(template, 'state'), 'another guest\'s state\n')],
    ['ram truncated to nothing', (template: string) => truncateSync(join(template, 'ram'), 0)],
    ['ram changed, its size kept', (template: string) => writeFileSync(join(template, 'ram'), Buffer.alloc(16 << 20, 1))],
    ['state gone', (template: string) => rmSync(join(template, 'state'))],
    ['manifest gone', (template: string) => rmSync(join(template, 'manifest.json'))],
  ])('makes the template again when it does not match its manifest (%s), saying which folder', async (_name, damage) => {
    const { host, log, pids, lines, template } = fakeHost()
    await prepareSnapshot(host, log)
    damage(template)
    const files = await prepareSnapshot(host, log)
    expect(pids()).toHaveLength(2)
    expect(messages(lines, 'the saved template is damaged; making it again')).toMatchObject([{ dir: template }])
    expect(readFileSync(files.statePath, 'utf8')).toBe('fake device state\n')
    expect(statSync(files.ramPath).size).toBe(16 << 20)
  })

  it('saves the RAM file with all its room taken on the disk, holes filled, so that clones reading it cannot hit a full disk', async () => {
    const { host, log, template } = fakeHost()
    await prepareSnapshot(host, log)
    const ram = statSync(join(template, 'ram'))
    expect(ram.size).toBe(16 << 20)
    expect(ram.blocks * 512).toBeGreaterThanOrEqual(ram.size)
  })

  it('removes templates of other keys that no live vmcgi uses, and keeps the rest', async () => {
    const { host, log, lines, root } = fakeHost()
    mkdirSync(root, { recursive: true, mode: 0o700 })
    const make = (name: string, files: string[]) => {
      mkdirSync(join(root, name))
      for (const file of files) writeFileSync(join(root, name, file), '')
    }
    const deadPid = 99_999_999
    make('00000000000000aa', ['ram', 'state'])
    make('00000000000000bb', ['ram', `in-use-by-${deadPid}`])
    make('00000000000000cc', ['ram', `in-use-by-${process.ppid}`])
    make(`00000000000000dd.${deadPid}.partial`, ['ram'])
    make(`00000000000000ee.${process.ppid}.partial`, ['ram'])
    make('not-a-template', [])
    await prepareSnapshot(host, log)
    const left = readdirSync(root).sort()
    expect(left).toEqual(['00000000000000cc', `00000000000000ee.${process.ppid}.partial`, snapshotKey(host), 'not-a-template'].sort())
    expect(messages(lines, 'removed a template no vmcgi uses')).toHaveLength(3)
  })

  it('opens the template\'s RAM read-only only where QEMU can still map it writable (7.2 has no rom)', async () => {
    const { host, log } = fakeHost()
    expect((await prepareSnapshot(host, log)).readOnlyRam).toBe(false)
  })
})

describe('prepareClones', () => {
  const preflightClone = (log: Parameters<typeof prepareSnapshot>[1]) => async (probe: HostProbe) => {
    const vm = createQemuVmFactory(probe)(log)
    try {
      await vm.boot(new AbortController().signal)
      return probe
    } catch (error) {
      throw new ConfigError('vm', `the guest did not boot: ${(error as Error).message}`)
    } finally {
      await vm.destroy(new Error('the preflight is over'))
    }
  }

  it('makes a saved template once more when its first clone fails', async () => {
    // Starts: 1 the template, 2 its clone, at the next vmcgi's start 3 a clone that fails, 4 the template again, 5 its clone.
    const { host, log, pids, lines, template } = fakeHost('listen=0 3:qmp-fail=migrate-incoming')
    await prepareClones(host, log, preflightClone(log))
    const again = await prepareClones(host, log, preflightClone(log))
    expect(pids()).toHaveLength(5)
    expect(messages(lines, 'a clone of the saved template did not boot; making the template again')).toMatchObject([{ dir: template }])
    await expectCloneAnswers(host, again.snapshot, log)
  })

  it('refuses and discards a template just made whose clone fails, naming its folder', async () => {
    const { host, log, pids, template } = fakeHost('listen=0 2:qmp-fail=migrate-incoming')
    const failure = prepareClones(host, log, preflightClone(log))
    await expect(failure).rejects.toSatisfy((error) => error instanceof ConfigError && error.field === 'vm.snapshot')
    await expect(failure).rejects.toThrow(template)
    expect(pids()).toHaveLength(2)
    expect(existsSync(template)).toBe(false)
  })
})
