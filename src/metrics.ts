// Prometheus metrics, served by the admin listener (src/admin.ts) apart from
// the proxy, so that no request through the proxy can reach them.

import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics, exponentialBuckets } from 'prom-client'

export interface MetricSources {
  booting: () => number
  pooled: () => number
  serving: () => number
  queued: () => number
}

export class Metrics {
  readonly registry = new Registry()
  readonly #bootSeconds: Histogram
  readonly #requests: Counter

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'vmcgi_process_' })
    // 10 ms to about 20 s: a KVM boot on a Pi to a slow TCG boot.
    this.#bootSeconds = new Histogram({
      name: 'vmcgi_vm_boot_seconds',
      help: 'From spawning QEMU to the guest\'s first HTTP answer',
      labelNames: ['accelerated'],
      buckets: exponentialBuckets(0.01, 2, 12),
      registers: [this.registry],
    })
    this.#requests = new Counter({
      name: 'vmcgi_requests_total',
      help: 'Requests answered, by vmcgi-status and HTTP status',
      labelNames: ['vmcgi_status', 'code'],
      registers: [this.registry],
    })
  }

  /** Gauges read their values when scraped. */
  watch(sources: MetricSources): void {
    const states = { booting: sources.booting, pooled: sources.pooled, serving: sources.serving }
    new Gauge({
      name: 'vmcgi_vms',
      help: 'VMs by state: booting, pooled (booted and waiting for a request) and serving',
      labelNames: ['state'],
      registers: [this.registry],
      collect() {
        for (const [state, read] of Object.entries(states)) this.set({ state }, read())
      },
    })
    new Gauge({
      name: 'vmcgi_queue_length',
      help: 'Requests waiting for a VM slot (limits.maxVms)',
      registers: [this.registry],
      collect() {
        this.set(sources.queued())
      },
    })
  }

  observeBoot(bootMs: number, accelerated: boolean): void {
    this.#bootSeconds.observe({ accelerated: String(accelerated) }, bootMs / 1000)
  }

  countRequest(vmcgiStatus: string, code: number): void {
    this.#requests.inc({ vmcgi_status: vmcgiStatus, code: String(code) })
  }
}
