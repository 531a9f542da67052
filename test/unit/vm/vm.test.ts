// QemuVm's boot loop, states and ends, against the real QemuVm and a fake QEMU (test/fixtures/fake-qemu.js).

import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { pino } from 'pino'
import { describe, expect, it, onTestFinished } from 'vitest'
import type { GuestVm } from '../../../src/vm/guest.js'
import { createQemuVmFactory, type VmEnvironment } from '../../../src/vm/vm.js'
import { fakeConfig } from '../../helpers/fixtures.js'

const fakeQemu = fileURLToPath(new URL('../../fixtures/fake-qemu.js', import.meta.url))

interface Setup {
  env: VmEnvironment
  /** Log lines, parsed. */
  lines: Array<Record<string, unknown>>
  /** The pids of the fake QEMUs started so far, in order. */
  pids: () => number[]
  /** A VM made by the real factory; destroyed when the test ends, and every QEMU it started checked gone. */
  createVm: () => GuestVm
}

/**
 * A VM environment whose QEMU is the fake, told what to do by `behaviour` (words of -append,
 * see the fixture), with short timeouts unless `overrides` says otherwise.
 */
function setUp(behaviour: string, overrides: Record<string, Record<string, unknown>> = {}, clone = false): Setup {
  const dir = mkdtempSync(join(tmpdir(), 'vmcgi-vm-test-'))
  onTestFinished(() => rmSync(dir, { recursive: true, force: true }))
  const attempts = join(dir, 'attempts')
  const config = fakeConfig({
    ...overrides,
    vm: { qemu: fakeQemu, append: `attempts=${attempts} ${behaviour}`, killGraceMs: 200, ...overrides.vm },
    readiness: { timeoutMs: 3_000, intervalMs: 10, attemptTimeoutMs: 100, ...overrides.readiness },
  })
  const snapshot = clone ? { ramPath: join(dir, 'ram'), statePath: join(dir, 'state') } : undefined
  if (snapshot) writeFileSync(snapshot.statePath, 'template device state\n')
  const env: VmEnvironment = { config, accel: { accel: 'tcg', reason: 'a test' }, sandbox: false, deathSignalPrefix: [], snapshot }
  const lines: Array<Record<string, unknown>> = []
  const log = pino({ level: 'debug' }, { write: (line: string) => void lines.push(JSON.parse(line) as Record<string, unknown>) })
  const pids = () => {
    try {
      return readFileSync(attempts, 'utf8').trim().split('\n').filter(Boolean).map(Number)
    } catch {
      return []
    }
  }
  const createVm = () => {
    const vm = createQemuVmFactory(env)(log)
    onTestFinished(async () => {
      await vm.destroy(new Error('the test ended'))
      expect(pids().filter(alive)).toEqual([])
    })
    return vm
  }
  return { env, lines, pids, createVm }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

const never = () => new AbortController().signal

/** How long `promise` took to settle, and its rejection if any. */
async function timed(promise: Promise<unknown>): Promise<{ ms: number; error: unknown }> {
  const started = performance.now()
  const error = await promise.then(() => undefined, (reason: unknown) => reason)
  return { ms: performance.now() - started, error }
}

describe('QemuVm', () => {
  it('boots, answers on its origin, serves, and is stopped by close()', async () => {
    const { createVm, pids } = setUp('listen=50 ready=60')
    const vm = createVm()
    expect(vm.state).toBe('created')
    await vm.boot(never())
    expect(vm.state).toBe('ready')
    expect(vm.bootMs).toBeGreaterThan(0)
    expect(await (await fetch(vm.origin)).text()).toBe('fake guest\n')
    expect(vm.consoleTail()).toContain('vmcgi: ready')
    vm.markServing()
    expect(vm.state).toBe('serving')
    await vm.close()
    expect(vm.state).toBe('stopped')
    expect(pids().filter(alive)).toEqual([])
  })

  it('starts QEMU again on another port when its port was taken', async () => {
    const { createVm, pids } = setUp('1:port-taken=0 listen=50')
    const vm = createVm()
    await vm.boot(never())
    expect(pids()).toHaveLength(2)
    expect(alive(pids()[0]!)).toBe(false)
    expect(await (await fetch(vm.origin)).text()).toBe('fake guest\n')
  })

  it('probes at the ready line of the attempt after a port retry, not only at the first attempt\'s', async () => {
    // Polling is off (one probe at the start, refused): only the second QEMU's
    // ready line can start the probe that succeeds. The first QEMU printed one too.
    const { createVm, pids } = setUp('1:ready=0 1:port-taken=100 listen=100 ready=300', {
      readiness: { intervalMs: 60_000, timeoutMs: 3_000 },
    })
    const vm = createVm()
    await vm.boot(never())
    expect(pids()).toHaveLength(2)
    expect(vm.consoleTail()).toBe('vmcgi: ready\n')
  })

  it('gives up after three ports were taken, with VM_EXITED', async () => {
    const { createVm, pids } = setUp('port-taken=0 listen=50')
    const vm = createVm()
    await expect(vm.boot(never())).rejects.toMatchObject({ code: 'VM_EXITED' })
    expect(pids()).toHaveLength(3)
    expect(vm.state).toBe('stopped')
  })

  it('fails with SPAWN_FAILED when QEMU cannot be started', async () => {
    const setup = setUp('listen=0')
    const { config } = setup.env
    setup.env.config = { ...config, vm: { ...config.vm, qemu: join(tmpdir(), 'no-such-dir', 'qemu-system-aarch64') } }
    const vm = setup.createVm()
    await expect(vm.boot(never())).rejects.toMatchObject({ code: 'SPAWN_FAILED' })
    expect(vm.state).toBe('stopped')
  })

  it('fails with VM_EXITED as soon as QEMU exits during boot', async () => {
    const { createVm } = setUp('exit=3 exit-after=100', { readiness: { timeoutMs: 10_000 } })
    const vm = createVm()
    const { ms, error } = await timed(vm.boot(never()))
    expect(error).toMatchObject({ code: 'VM_EXITED' })
    expect(ms).toBeLessThan(3_000)
    expect(vm.state).toBe('stopped')
  })

  it('fails with BOOT_TIMEOUT when the guest never answers, and kills QEMU', async () => {
    const { createVm, pids } = setUp('', { readiness: { timeoutMs: 300 } })
    const vm = createVm()
    const { ms, error } = await timed(vm.boot(never()))
    expect(error).toMatchObject({ code: 'BOOT_TIMEOUT' })
    expect(ms).toBeGreaterThanOrEqual(290)
    expect(vm.state).toBe('stopped')
    expect(pids().filter(alive)).toEqual([])
  })

  it('ends a boot with the caller\'s reason when its signal aborts', async () => {
    const { createVm } = setUp('')
    const vm = createVm()
    const abort = new AbortController()
    setTimeout(() => abort.abort(new Error('the client left')), 100)
    await expect(vm.boot(abort.signal)).rejects.toThrow('the client left')
    expect(vm.state).toBe('stopped')
  })

  it('fails its boot with VM_EXITED when it is destroyed while it boots', async () => {
    const { createVm } = setUp('')
    const vm = createVm()
    const booting = vm.boot(never())
    setTimeout(() => void vm.destroy(new Error('shutting down')), 100)
    const { ms, error } = await timed(booting)
    expect(error).toMatchObject({ code: 'VM_EXITED' })
    expect(ms).toBeLessThan(2_000)
    expect(vm.state).toBe('stopped')
  })

  it('close() sends SIGTERM, then SIGKILL after vm.killGraceMs to a QEMU that ignores SIGTERM', async () => {
    const { createVm, lines } = setUp('listen=0 ignore-sigterm', { vm: { killGraceMs: 300 } })
    const vm = createVm()
    await vm.boot(never())
    const { ms } = await timed(vm.close())
    expect(ms).toBeGreaterThanOrEqual(290)
    expect(vm.consoleTail()).toContain('fake-qemu: ignoring SIGTERM')
    expect(lines.filter((line) => line.signal !== undefined).map((line) => line.signal)).toEqual(['SIGKILL'])
    expect(vm.state).toBe('stopped')
  })

  it('close() and destroy() are idempotent, destroy() cuts a close() short, and a stopped VM boots no more', async () => {
    const { createVm, lines } = setUp('listen=0 ignore-sigterm', { vm: { killGraceMs: 5_000 } })
    const vm = createVm()
    await vm.boot(never())
    const closing = vm.close()
    const { ms } = await timed(Promise.all([closing, vm.close(), vm.destroy(new Error('now')), vm.destroy(new Error('again'))]))
    expect(ms).toBeLessThan(2_000)
    await vm.close()
    await vm.destroy(new Error('once more'))
    expect(vm.state).toBe('stopped')
    const changes = lines.filter((line) => line.to !== undefined).map((line) => `${String(line.from)}→${String(line.to)}`)
    expect(changes).toEqual(['created→booting', 'booting→ready', 'ready→stopping', 'stopping→stopped'])
    await expect(vm.boot(never())).rejects.toMatchObject({ code: 'INTERNAL' })
    await vm.exited
  })

  it('restores a clone over QMP and reseeds it before it serves', async () => {
    const { createVm, lines } = setUp('listen=0', {}, true)
    const vm = createVm()
    await vm.boot(never())
    expect(await (await fetch(vm.origin)).text()).toBe('fake guest\n')
    const booted = lines.find((line) => line.mode === 'clone')
    expect(booted?.phases).toHaveProperty('reseeded')
  })
})
