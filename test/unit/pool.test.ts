import pino from 'pino'
import { describe, expect, it, onTestFinished } from 'vitest'
import { VmPool } from '../../src/pool.js'
import { fakeVmFactory, type BootBehaviour } from '../helpers/fake-vm.js'

const log = pino({ level: 'silent' })
const never = new AbortController().signal

function pool(size: number, behaviour: BootBehaviour = 'ok', refillDelayMs?: number) {
  const { createVm, vms } = fakeVmFactory(behaviour, (_req, res) => res.end('ok'))
  const vmPool = new VmPool(size, createVm, log, refillDelayMs === undefined ? {} : { refillDelayMs })
  onTestFinished(() => vmPool.destroy())
  return { vmPool, vms }
}

describe('VmPool', () => {
  it('boots pool.size VMs ahead and hands out a warm one with no wait', async () => {
    const { vmPool, vms } = pool(2)
    vmPool.start()
    await expect.poll(() => vmPool.ready).toBe(2)
    const taken = await vmPool.take(log, never)
    expect(taken).toMatchObject({ warm: true, waitMs: 0 })
    expect(taken.vm.state).toBe('ready')
    await taken.vm.close()
    await expect.poll(() => vmPool.ready).toBe(2)
    expect(vms).toHaveLength(3)
  })

  it('replaces a VM it hands out once that VM has exited, not beside the request it serves', async () => {
    const { vmPool, vms } = pool(1, 'ok', 60_000)
    vmPool.start()
    await expect.poll(() => vmPool.ready).toBe(1)
    const taken = await vmPool.take(log, never)
    await new Promise((resolve) => setTimeout(resolve, 100))
    expect(vms).toHaveLength(1)
    await taken.vm.close()
    await expect.poll(() => vmPool.ready).toBe(1)
    expect(vms).toHaveLength(2)
  })

  it('replaces it anyway a little after it was taken when its request takes long', async () => {
    const { vmPool, vms } = pool(1, 'ok', 200)
    vmPool.start()
    await expect.poll(() => vmPool.ready).toBe(1)
    const started = performance.now()
    const taken = await vmPool.take(log, never)
    await expect.poll(() => vms.length).toBe(2)
    expect(performance.now() - started).toBeGreaterThanOrEqual(190)
    await expect.poll(() => vmPool.ready).toBe(1)
    expect(taken.vm.state).toBe('ready')
  })

  it('drops a warm VM that is no longer running instead of handing it out', async () => {
    const { vmPool, vms } = pool(1)
    vmPool.start()
    await expect.poll(() => vmPool.ready).toBe(1)
    vms[0]!.frozen = true
    const taken = await vmPool.take(log, never)
    expect(taken.vm).not.toBe(vms[0])
    expect(taken.vm.state).toBe('ready')
    await expect.poll(() => vms[0]!.state).toBe('stopped')
  })

  it('boots a VM for the request when the pool is empty', async () => {
    const { vmPool } = pool(1)
    vmPool.start()
    await expect.poll(() => vmPool.ready).toBe(1)
    const [first, second, third] = await Promise.all([1, 2, 3].map(() => vmPool.take(log, never)))
    expect([first!.warm, second!.warm, third!.warm].filter(Boolean)).toHaveLength(1)
    expect(new Set([first!.vm, second!.vm, third!.vm]).size).toBe(3)
  })

  it('gives a request that finds the pool empty the VM the pool is booting, unwarmed, rather than boot one more', async () => {
    const { createVm, vms } = fakeVmFactory('ok', (_req, res) => res.end('ok'))
    let release!: () => void
    const gate = new Promise<void>((resolve) => (release = resolve))
    const warmUps: string[] = []
    const vmPool = new VmPool(1, (l) => {
      const vm = createVm(l) as (typeof vms)[number]
      vm.bootGate = gate
      return vm
    }, log, { warmUp: async (vm) => void warmUps.push(vm.id) })
    onTestFinished(() => vmPool.destroy())
    vmPool.start()
    const taken = vmPool.take(log, never)
    await new Promise((resolve) => setTimeout(resolve, 20))
    expect(vms).toHaveLength(1) // the request waits for the pool's VM; it boots none of its own
    release()
    const { vm, warm } = await taken
    expect(vm).toBe(vms[0])
    expect(warm).toBe(false)
    expect(warmUps).not.toContain(vm.id)
    // The pool boots a replacement, warmed as usual.
    await expect.poll(() => vmPool.ready).toBe(1)
    expect(warmUps).toEqual([vms[1]!.id])
  })

  it('boots the request its own VM when the pool\'s boot it waited for fails', async () => {
    const { vmPool, vms } = pool(1, 'exit')
    vmPool.start()
    await expect(vmPool.take(log, never)).rejects.toMatchObject({ code: 'VM_EXITED' })
    expect(vms.length).toBeGreaterThanOrEqual(2)
  })

  it('with size 0 boots every VM on demand and keeps none', async () => {
    const { vmPool, vms } = pool(0)
    vmPool.start()
    const taken = await vmPool.take(log, never)
    expect(taken.warm).toBe(false)
    expect(vmPool.ready).toBe(0)
    expect(vms).toHaveLength(1)
  })

  it('destroys a VM whose boot for a request failed', async () => {
    const { vmPool, vms } = pool(0, 'exit')
    await expect(vmPool.take(log, never)).rejects.toMatchObject({ code: 'VM_EXITED' })
    expect(vms[0]!.state).toBe('stopped')
  })

  it('replaces a warm VM that dies while it waits', async () => {
    const { vmPool, vms } = pool(1)
    vmPool.start()
    await expect.poll(() => vmPool.ready).toBe(1)
    await vms[0]!.destroy(new Error("killed by the test"))
    await expect.poll(() => vms.length).toBe(2)
    await expect.poll(() => vmPool.ready).toBe(1)
  })

  it('backs off instead of spinning when the guest cannot boot', async () => {
    const { vmPool, vms } = pool(2, 'exit')
    vmPool.start()
    await new Promise((resolve) => setTimeout(resolve, 300))
    expect(vms.length).toBeLessThanOrEqual(2)
    expect(vms.every((vm) => vm.state === 'stopped')).toBe(true)
  })

  it('kills every VM it holds when destroyed, and refuses to hand out more', async () => {
    const { vmPool, vms } = pool(2)
    vmPool.start()
    await expect.poll(() => vmPool.ready).toBe(2)
    await vmPool.destroy()
    expect(vms.every((vm) => vm.state === 'stopped')).toBe(true)
    await expect(vmPool.take(log, never)).rejects.toMatchObject({ code: 'SHUTTING_DOWN' })
  })
})
