// The admin listener: /metrics on its own address and port, apart from the
// proxy. It answers nothing else.

import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify'
import type { Metrics } from './metrics.js'

export function buildAdminServer(metrics: Metrics, logger: FastifyBaseLogger): FastifyInstance {
  const admin = Fastify({ loggerInstance: logger.child({ listener: 'admin' }) }) as unknown as FastifyInstance
  admin.get('/metrics', async (_request, reply) => {
    reply.type(metrics.registry.contentType)
    return metrics.registry.metrics()
  })
  return admin
}
