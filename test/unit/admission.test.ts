import { describe, expect, it } from 'vitest'
import { Admission } from '../../src/admission.js'

const never = new AbortController().signal

describe('Admission', () => {
  it('lets maxVms run at once and queues the rest in order', async () => {
    const admission = new Admission({ maxVms: 2, queueSize: 5, maxWaitMs: 5_000 })
    const first = await admission.acquire(never)
    await admission.acquire(never)
    expect(admission.running).toBe(2)
    const order: number[] = []
    const third = admission.acquire(never).then((release) => (order.push(3), release))
    const fourth = admission.acquire(never).then((release) => (order.push(4), release))
    expect(admission.queued).toBe(2)
    first()
    ;(await third)()
    await fourth
    expect(order).toEqual([3, 4])
    expect(admission.running).toBe(2)
  })

  it('refuses at once with OVERLOADED when the queue is full', async () => {
    const admission = new Admission({ maxVms: 1, queueSize: 1, maxWaitMs: 5_000 })
    await admission.acquire(never)
    const queued = admission.acquire(never)
    await expect(admission.acquire(never)).rejects.toMatchObject({ code: 'OVERLOADED', statusCode: 503 })
    expect(admission.queued).toBe(1)
    void queued
  })

  it('gives up a queued request after maxWaitMs with OVERLOADED', async () => {
    const admission = new Admission({ maxVms: 1, queueSize: 1, maxWaitMs: 50 })
    await admission.acquire(never)
    await expect(admission.acquire(never)).rejects.toMatchObject({ code: 'OVERLOADED' })
    expect(admission.queued).toBe(0)
  })

  it('drops a queued request whose client leaves', async () => {
    const admission = new Admission({ maxVms: 1, queueSize: 1, maxWaitMs: 5_000 })
    await admission.acquire(never)
    const abort = new AbortController()
    const waiting = admission.acquire(abort.signal)
    abort.abort(new Error('gone'))
    await expect(waiting).rejects.toThrow('gone')
    expect(admission.queued).toBe(0)
  })

  it('counts a release once, however often it is called', async () => {
    const admission = new Admission({ maxVms: 1, queueSize: 0, maxWaitMs: 5_000 })
    const release = await admission.acquire(never)
    release()
    release()
    expect(admission.running).toBe(0)
    await admission.acquire(never)
    expect(admission.running).toBe(1)
  })
})
