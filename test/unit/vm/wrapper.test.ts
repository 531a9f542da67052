// A vm.qemu that is a wrapper script which does not exec QEMU (the fake one, test/fixtures/fake-qemu.js): it boots, and every end leaves no process of its group.

import { spawn } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import { once } from 'node:events'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { pino } from 'pino'
import { describe, expect, it, onTestFinished } from 'vitest'
import { keeperPrefix } from '../../../src/vm/host.js'
import { groupMembers, isLive, readStat } from '../../../src/vm/process-group.js'
import { QemuProcess } from '../../../src/vm/qemu-process.js'
import { findListener } from '../../../src/vm/readiness.js'
import { createQemuVmFactory } from '../../../src/vm/vm.js'
import { setUp, type Setup } from './fake-qemu.js'

const fakeQemu = fileURLToPath(new URL('../../fixtures/fake-qemu.js', import.meta.url))
const never = () => new AbortController().signal

/** The processes of group `pgid` that still run; a zombie waits for init to reap it, and runs no more. */
const leftOf = (pgid: number) => groupMembers(pgid).filter((member) => isLive(member.state)).map((member) => member.pid)

/**
 * Points the setup's vm.qemu at a wrapper around the fake QEMU that does not
 * exec it, started through host.ts's keeper (as probeHost does for a script
 * where setpriv works) unless `keeper` is false. Returns the VM and, once it
 * has started QEMU, QEMU's process group; every process of the group is
 * checked gone when the test ends.
 */
function wrappedVm(setup: Setup, { keeper = true } = {}) {
  const wrapper = join(setup.dir, 'qemu-wrapper')
  writeFileSync(wrapper, `#!/bin/sh\n# QEMU is this shell's child, not this shell.\n'${fakeQemu}' "$@"\n`, { mode: 0o755 })
  const { config } = setup.env
  setup.env.config = { ...config, vm: { ...config.vm, qemu: wrapper } }
  setup.env.deathSignalPrefix = keeper ? keeperPrefix : []
  setup.env.keeper = keeper
  const vm = createQemuVmFactory(setup.env)(setup.log)
  const groups = new Set<number>()
  const group = () => {
    const qemu = setup.pids()[0]
    const pgrp = qemu === undefined ? undefined : readStat(qemu)?.pgrp
    if (pgrp !== undefined) groups.add(pgrp)
    return pgrp
  }
  onTestFinished(async () => {
    await vm.destroy(new Error('the test ended'))
    for (const pgid of groups) await expect.poll(() => leftOf(pgid), { timeout: 2_000, interval: 20 }).toEqual([])
  })
  return { vm, group }
}

/** How long `promise` took to settle, and its rejection if any. */
async function timed(promise: Promise<unknown>): Promise<{ ms: number; error: unknown }> {
  const started = performance.now()
  const error = await promise.then(() => undefined, (reason: unknown) => reason)
  return { ms: performance.now() - started, error }
}

describe.runIf(process.platform === 'linux')('QemuVm with a wrapper that does not exec QEMU', () => {
  it('boots, answers, and close() leaves no process of its group', async () => {
    const setup = setUp('listen=50 ready=60')
    const { vm, group } = wrappedVm(setup)
    await vm.boot(never())
    expect(await (await fetch(vm.origin)).text()).toBe('fake guest\n')
    expect(await vm.isRunning()).toBe(true)
    const pgid = group()!
    // The keeper leads the group; the wrapper and QEMU are its other processes.
    expect(pgid).not.toBe(setup.pids()[0])
    expect(leftOf(pgid)).toHaveLength(3)
    vm.markServing()
    await vm.close()
    expect(vm.state).toBe('stopped')
    await expect.poll(() => leftOf(pgid), { timeout: 2_000, interval: 20 }).toEqual([])
  })

  it('destroy() while it boots leaves no process of its group', async () => {
    const setup = setUp('')
    const { vm, group } = wrappedVm(setup)
    const booting = timed(vm.boot(never()))
    await expect.poll(group).toBeDefined()
    const [{ ms, error }] = await Promise.all([booting, vm.destroy(new Error('the client left'))])
    expect(error).toMatchObject({ code: 'VM_EXITED' })
    expect(ms).toBeLessThan(2_000)
    await expect.poll(() => leftOf(group()!), { timeout: 2_000, interval: 20 }).toEqual([])
  })

  it('fails with BOOT_TIMEOUT when the guest never answers, and leaves no process of its group', async () => {
    const setup = setUp('', { readiness: { timeoutMs: 300 } })
    const { vm, group } = wrappedVm(setup)
    const booting = timed(vm.boot(never()))
    await expect.poll(group).toBeDefined()
    const { ms, error } = await booting
    expect(error).toMatchObject({ code: 'BOOT_TIMEOUT' })
    expect(ms).toBeLessThan(2_000)
    await expect.poll(() => leftOf(group()!), { timeout: 2_000, interval: 20 }).toEqual([])
  })

  it('close() ends a QEMU that ignores SIGTERM, and leaves no process of its group', async () => {
    // The keeper and the wrapper die of SIGTERM at once; Node then closes QEMU's stdin, and the fake QEMU exits
    // at that (the real one does not, and is killed after the grace).
    const setup = setUp('listen=0 ignore-sigterm', { vm: { killGraceMs: 300 } })
    const { vm, group } = wrappedVm(setup)
    await vm.boot(never())
    const pgid = group()!
    const { ms } = await timed(vm.close())
    expect(ms).toBeLessThan(2_000)
    expect(vm.consoleTail()).toContain('fake-qemu: ignoring SIGTERM')
    await expect.poll(() => leftOf(pgid), { timeout: 2_000, interval: 20 }).toEqual([])
  })

  it('is no longer running once QEMU under the wrapper is killed', async () => {
    const setup = setUp('listen=0')
    const { vm } = wrappedVm(setup)
    await vm.boot(never())
    expect(await vm.isRunning()).toBe(true)
    process.kill(setup.pids()[0]!, 'SIGKILL')
    await expect.poll(() => vm.isRunning(), { timeout: 2_000, interval: 10 }).toBe(false)
    await vm.exited
  })

  it('passes the exit status of QEMU under the wrapper on', async () => {
    const setup = setUp('exit=3 exit-after=100', { readiness: { timeoutMs: 10_000 } })
    const { vm } = wrappedVm(setup)
    await expect(vm.boot(never())).rejects.toMatchObject({ code: 'VM_EXITED' })
    expect(setup.lines.find((line) => line.msg === 'QEMU exited')).toMatchObject({ exitCode: 3 })
  })

  it('boots and closes without the keeper too (no setpriv): the wrapper leads the group', async () => {
    const setup = setUp('listen=50')
    const { vm, group } = wrappedVm(setup, { keeper: false })
    await vm.boot(never())
    const pgid = group()!
    expect(leftOf(pgid)).toHaveLength(2)
    await vm.close()
    await expect.poll(() => leftOf(pgid), { timeout: 2_000, interval: 20 }).toEqual([])
  })
})

describe.runIf(process.platform === 'linux')('QemuProcess and a process that leaves its group', () => {
  it('resolves `exited` soon after the child exits, although a process outside its group holds its stdio', async () => {
    // The grandchild takes a session of its own, out of the group's reach, and keeps stdout and stderr open.
    const qemu = new QemuProcess({ argv: ['sh', '-c', 'setsid sleep 30 & echo $!; exit 4'], killGraceMs: 100, log: pino({ level: 'silent' }) })
    const escaped = Number(await new Promise<string>((resolve) => qemu.stdout.once('data', (chunk: Buffer) => resolve(chunk.toString()))))
    onTestFinished(() => void process.kill(escaped, 'SIGKILL'))
    const { ms } = await timed(qemu.exited)
    expect(await qemu.exited).toMatchObject({ code: 'VM_EXITED' })
    expect(ms).toBeLessThan(3_000)
  })
})

describe.runIf(process.platform === 'linux')('findListener and a process group', () => {
  it('finds the listener of a process of the group other than its leader, and only of the group', async () => {
    // A shell leads the group, as a wrapper does; its child listens.
    const listener = 'const s = require("net").createServer().listen(0, "127.0.0.1", () => console.log(s.address().port))'
    const leader = spawn('sh', ['-c', `'${process.execPath}' -e '${listener}'; :`], { detached: true, stdio: ['ignore', 'pipe', 'ignore'] })
    onTestFinished(() => void process.kill(-leader.pid!, 'SIGKILL'))
    const [chunk] = (await once(leader.stdout, 'data')) as [Buffer]
    const port = Number(chunk.toString())
    expect(findListener(leader.pid!, port)).toMatchObject({ target: expect.stringMatching(/^socket:\[\d+\]$/) })
    // The test's own process is of another group.
    expect(findListener(process.pid, port)).toBe(false)
  })
})
