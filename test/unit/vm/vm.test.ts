// QemuVm's boot loop, states and ends, against the real QemuVm and a fake QEMU (test/fixtures/fake-qemu.js).

import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { alive, setUp } from './fake-qemu.js'

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

  // Either way its process lives on a while: only the event, or the forward's descriptor, tells.
  it.each([
    ['announces its shutdown (its guest powered off)', 'listen=0 shutdown=300', false],
    ['no longer holds its forward, as when it is killed', 'listen=0 unlisten=300', true],
  ] as const)('is not running once QEMU %s, while its process is still there', async (_end, words, linuxOnly) => {
    if (linuxOnly && process.platform !== 'linux') return
    const { createVm, pids } = setUp(words)
    const vm = createVm()
    await vm.boot(never())
    expect(await vm.isRunning()).toBe(true)
    await expect.poll(() => vm.isRunning(), { timeout: 2_000, interval: 5 }).toBe(false)
    expect(pids().filter(alive)).toHaveLength(1)
    await vm.destroy(new Error('the test ends'))
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
    const { createVm, lines } = setUp('listen=0', {}, { clone: true })
    const vm = createVm()
    await vm.boot(never())
    expect(await (await fetch(vm.origin)).text()).toBe('fake guest\n')
    const booted = lines.find((line) => line.mode === 'clone')
    expect(booted?.phases).toHaveProperty('reseeded')
  })

  it('fails a clone whose restore QMP refuses with RESTORE_FAILED, not SPAWN_FAILED, and logs QMP\'s error', async () => {
    const { createVm, lines } = setUp('listen=0 qmp-fail=migrate-incoming', {}, { clone: true })
    const vm = createVm()
    await expect(vm.boot(never())).rejects.toMatchObject({ code: 'RESTORE_FAILED', statusCode: 502, status: 'restore-failed' })
    expect(lines.find((line) => line.qmp !== undefined)?.qmp).toEqual({ command: 'migrate-incoming', error: 'fake-qemu refuses migrate-incoming' })
    expect(vm.state).toBe('stopped')
  })

  it('fails a clone whose guest agent could not reseed at once, not at the boot timeout', async () => {
    const { createVm } = setUp('listen=0 reseed=fail', { readiness: { timeoutMs: 10_000 } }, { clone: true })
    const vm = createVm()
    const { ms, error } = await timed(vm.boot(never()))
    expect(error).toMatchObject({ code: 'RESTORE_FAILED' })
    expect(ms).toBeLessThan(3_000)
    expect(vm.state).toBe('stopped')
  })
})
