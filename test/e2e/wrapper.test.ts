// A vm.qemu that is a wrapper script which does not exec QEMU: the real CLI and real QEMU answer through it, and no process of it is left after any end.

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { execa } from 'execa'
import { request } from 'undici'
import { afterAll, describe, expect, it } from 'vitest'
import { qemuProcesses } from '../support/proc.js'
import { expectGuestPage, startVmcgi, type Vmcgi } from './harness.js'

const dir = mkdtempSync(join(tmpdir(), 'vmcgi-wrapper-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))
// Its name says which guest it runs (vmcgi reads the architecture from vm.qemu's name).
const wrapper = join(dir, 'qemu-system-aarch64-wrapper')
writeFileSync(wrapper, '#!/bin/sh\n# Not exec: QEMU is this shell\'s child.\nqemu-system-aarch64 "$@"\n', { mode: 0o755 })

/** vmcgi with vm.qemu the wrapper, the default guest. */
const startWrapped = () => startVmcgi({ vm: { qemu: wrapper } })

/**
 * What this file started that still runs, as "pid command": QEMU processes
 * named for one of `vmcgi`'s VMs, and the keeper and wrapper processes (their
 * command lines name the wrapper). Zombies are left out: init reaps them.
 */
async function left(vmcgi: Vmcgi): Promise<string[]> {
  const vms = new Set(vmcgi.logLines().map((line) => line.vm).filter((vm) => typeof vm === 'string'))
  const qemus = (await qemuProcesses()).filter((qemu) => qemu.state !== 'Z' && qemu.name !== undefined && vms.has(qemu.name))
  const wrappers = (await execa('pgrep', ['-a', '-f', wrapper], { reject: false })).stdout.split('\n').filter(Boolean)
  return [...new Set([...qemus.map((qemu) => `${qemu.pid} ${qemu.command}`), ...wrappers])].sort()
}

const expectNothingLeft = (vmcgi: Vmcgi) => expect.poll(() => left(vmcgi), { timeout: 5_000, interval: 100 }).toEqual([])

/** Resolves once `count` QEMUs of `vmcgi` run under the wrapper (the preflight's is gone once vmcgi listens). */
async function untilQemuRuns(vmcgi: Vmcgi, count = 1): Promise<void> {
  await expect.poll(async () => (await left(vmcgi)).filter((line) => / -name vm-/.test(line) && !line.includes(wrapper)).length, { timeout: 30_000, interval: 50 }).toBeGreaterThanOrEqual(count)
}

describe.runIf(process.platform === 'linux')('a wrapper around QEMU that does not exec it', () => {
  it('answers 200, and a VM closed after its request leaves no process of QEMU or the wrapper', async () => {
    const vmcgi = await startWrapped()
    await expectGuestPage(vmcgi)
    await expectGuestPage(vmcgi)
    await expectNothingLeft(vmcgi)
    await vmcgi.stop()
  })

  it('leaves no process when a client leaves while its VM boots', async () => {
    const vmcgi = await startWrapped()
    const leaving = new AbortController()
    const asked = request(`${vmcgi.url}/`, { signal: leaving.signal }).catch(() => undefined)
    await untilQemuRuns(vmcgi)
    leaving.abort()
    await asked
    await expectNothingLeft(vmcgi)
    await expectGuestPage(vmcgi)
    await vmcgi.stop()
  })

  it('leaves no process when vmcgi is sent SIGTERM while VMs boot', async () => {
    const vmcgi = await startWrapped()
    const asked = [1, 2].map(() => request(`${vmcgi.url}/`).then((res) => res.body.text()).catch(() => undefined))
    await untilQemuRuns(vmcgi)
    await vmcgi.stop()
    await Promise.all(asked)
    await expectNothingLeft(vmcgi)
  })

  it('leaves no process when vmcgi is killed with SIGKILL while VMs boot', async () => {
    const vmcgi = await startWrapped()
    const asked = [1, 2].map(() => request(`${vmcgi.url}/`).then((res) => res.body.text()).catch(() => undefined))
    await untilQemuRuns(vmcgi, 2)
    vmcgi.child.kill('SIGKILL')
    await vmcgi.child
    await Promise.all(asked)
    await expectNothingLeft(vmcgi)
  })
})
