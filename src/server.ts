// buildServer: the HTTP edge's plugins registered in order, around the VMs
// that serve requests. No listen() here, so that tests can inject() or listen
// on port 0. Each concept lives in its own file under src/http/.

import replyFrom from '@fastify/reply-from'
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from 'fastify'
import { Agent } from 'undici'
import type { Config } from './config.js'
import { Admission } from './admission.js'
import { VmcgiError } from './errors.js'
import { accessLog } from './http/access-log.js'
import { exchanges } from './http/exchange.js'
import { answerClientError, failureResponses, sendFailure } from './http/failure-response.js'
import { requestBody } from './http/request-body.js'
import { shutdown } from './http/shutdown.js'
import { vmRoute } from './http/vm-route.js'
import { VmLeases } from './lease.js'
import { Metrics } from './metrics.js'
import { VmPool } from './pool.js'
import type { VmFactory } from './vm/guest.js'
import { warmUp } from './vm/readiness.js'

export interface ServerDeps {
  createVm: VmFactory
  /** Where counters and histograms go; a private registry by default. */
  metrics?: Metrics
  /** A pino logger; by default one is made at config.log.level. */
  logger?: FastifyBaseLogger
}

declare module 'fastify' {
  interface FastifyInstance {
    admission: Admission
    pool: VmPool
  }
}

export async function buildServer(config: Config, deps: ServerDeps): Promise<FastifyInstance> {
  const app = Fastify({
    ...(deps.logger ? { loggerInstance: deps.logger } : { logger: { level: config.log.level } }),
    // One log line per request, written when its response closes (http/access-log.ts).
    logController: new LogController({ disableRequestLogging: true }),
    requestIdHeader: 'x-request-id',
    // timeouts.requestMs bounds a request (http/exchange.ts); Node's own timer would answer without vmcgi-status.
    requestTimeout: 0,
    // Answered by http/shutdown.ts, with vmcgi-status and Retry-After.
    return503OnClosing: false,
    clientErrorHandler: answerClientError,
    // Host is checked with the rest of the request target (http/vm-route.ts), and answered with vmcgi-status.
    http: { requireHostHeader: false },
    // A URL the router cannot decode (/%ZZ), answered like every other failure.
    frameworkErrors: (error, request, reply) => sendFailure(request, reply, error),
  }) as unknown as FastifyInstance
  // Past limits.connections Node closes each new connection as soon as it is
  // accepted, so that idle clients cannot take the descriptors VMs need.
  app.server.maxConnections = config.limits.connections
  app.server.on('drop', (peer) => app.log.warn({ remoteAddress: peer?.remoteAddress, connections: config.limits.connections }, 'connection dropped: limits.connections reached'))

  // One Agent for all VMs: each VM is a new origin, and undici (≥ 7.15) drops
  // the origin's pool once its sockets close, which they do when the VM dies.
  const agent = new Agent({
    headersTimeout: config.timeouts.headersMs,
    bodyTimeout: config.timeouts.bodyIdleMs,
    keepAliveTimeout: 1_000,
    connect: { timeout: config.timeouts.headersMs },
  })
  await app.register(replyFrom, { undici: agent, disableCache: true, disableRequestLogging: true })

  const { limits, pool: poolConfig, readiness } = config
  const admission = new Admission({ maxVms: limits.maxVms, queueSize: limits.queue.size, maxWaitMs: limits.queue.maxWaitMs })
  const metrics = deps.metrics ?? new Metrics()
  const pool = new VmPool(poolConfig.size, deps.createVm, app.log, {
    onBooted: (vm) => metrics.observeBoot(vm.bootMs, vm.accelerated),
    warmUp: (vm) => warmUp({
      host: '127.0.0.1',
      port: Number(new URL(vm.origin).port),
      path: readiness.path,
      count: poolConfig.warmUpRequests,
      timeoutMs: readiness.attemptTimeoutMs * 10,
    }),
  })
  const leases = new VmLeases(admission, pool)
  const destroyAllVms = () => leases.destroyAll(new VmcgiError('SHUTTING_DOWN', 'vmcgi is shutting down'))
  metrics.watch({ booting: () => pool.booting, pooled: () => pool.ready, serving: () => leases.serving, queued: () => admission.queued })
  app.decorate('admission', admission)
  app.decorate('pool', pool)
  app.addHook('onReady', async () => pool.start())
  app.addHook('onClose', async () => {
    await destroyAllVms()
    await agent.close()
  })

  // In this order: every later hook finds the request's Exchange.
  await app.register(exchanges, { requestMs: config.timeouts.requestMs })
  await app.register(accessLog, { metrics })
  await app.register(shutdown, { destroyAllVms })
  await app.register(requestBody, {
    limitBytes: limits.bodyLimitBytes,
    bufferBytes: limits.bodyBufferBytes,
    idleMs: config.timeouts.clientBodyIdleMs,
    totalMs: config.timeouts.clientBodyMs,
    // A chunked body at most for every request admission lets run or wait.
    budgetBytes: (limits.maxVms + limits.queue.size) * limits.bodyLimitBytes,
  })
  await app.register(failureResponses)

  app.get(config.health.path, async (_request, reply) => {
    reply.header('vmcgi-status', 'OK').type('text/plain; charset=utf-8')
    return 'OK\n'
  })
  await app.register(vmRoute, { leases })
  return app
}
