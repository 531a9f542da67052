import { describe, expect, it, onTestFinished } from 'vitest'
import pino from 'pino'
import { Admission } from '../../src/admission.js'
import { VmcgiError } from '../../src/errors.js'
import { VmLeases } from '../../src/lease.js'
import { VmPool } from '../../src/pool.js'
import { fakeVmFactory } from '../helpers/fake-vm.js'

function leasing(maxVms = 1) {
  const { createVm, vms } = fakeVmFactory('ok', (_req, res) => res.end())
  const admission = new Admission({ maxVms, queueSize: 4, maxWaitMs: 5_000 })
  const pool = new VmPool(0, createVm, pino({ level: 'silent' }))
  onTestFinished(() => pool.destroy())
  return { leases: new VmLeases(admission, pool), admission, vms }
}

describe('VmLeases', () => {
  it('frees the slot only once the VM is closed', async () => {
    const { leases, admission, vms } = leasing()
    const lease = await leases.take(pino({ level: 'silent' }), new AbortController().signal)
    expect(admission.running).toBe(1)
    expect(leases.serving).toBe(1)
    const next = leases.take(pino({ level: 'silent' }), new AbortController().signal)
    expect(admission.queued).toBe(1)
    const ending = lease.end()
    expect(admission.running).toBe(1)
    await ending
    expect(vms[0]!.state).toBe('stopped')
    expect(leases.serving).toBe(0)
    const second = await next
    expect(second.vm).not.toBe(lease.vm)
    await second.end()
    expect(admission.running).toBe(0)
  })

  it('ends once, however often it is asked, and destroys with the reason given', async () => {
    const { leases, vms } = leasing()
    const lease = await leases.take(pino({ level: 'silent' }), new AbortController().signal)
    const reason = new VmcgiError('SHUTTING_DOWN', 'test')
    await Promise.all([lease.end(reason), lease.end(), lease.end(reason)])
    expect(vms[0]!.destroyedFor).toBe(reason)
  })

  it('frees the slot when no VM could be had', async () => {
    const { createVm } = fakeVmFactory('exit', (_req, res) => res.end())
    const admission = new Admission({ maxVms: 1, queueSize: 0, maxWaitMs: 1_000 })
    const pool = new VmPool(0, createVm, pino({ level: 'silent' }))
    const leases = new VmLeases(admission, pool)
    await expect(leases.take(pino({ level: 'silent' }), new AbortController().signal)).rejects.toMatchObject({ code: 'VM_EXITED' })
    expect(admission.running).toBe(0)
  })

  it('destroys every leased VM at shutdown', async () => {
    const { leases, vms } = leasing(2)
    await leases.take(pino({ level: 'silent' }), new AbortController().signal)
    await leases.take(pino({ level: 'silent' }), new AbortController().signal)
    const reason = new VmcgiError('SHUTTING_DOWN', 'test')
    await leases.destroyAll(reason)
    expect(vms.map((vm) => vm.destroyedFor)).toEqual([reason, reason])
    expect(leases.serving).toBe(0)
  })
})
