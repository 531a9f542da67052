// The catalogue of every way a request can fail. Each entry has a stable code,
// the HTTP status the client gets and the short reason sent as `vmcgi-status`.
// server.ts turns these into responses in one place, sendFailure (and, for
// requests Node could not parse, which never reach Fastify, answerClientError).

// A failure after the response headers were sent cannot change the status: the
// connection is cut instead, and the reason goes to the log.
export const failures = {
  OVERLOADED: { statusCode: 503, status: 'overloaded' },
  SHUTTING_DOWN: { statusCode: 503, status: 'shutting-down' },
  BODY_TOO_LARGE: { statusCode: 413, status: 'body-too-large' },
  BOOT_TIMEOUT: { statusCode: 504, status: 'boot-timeout' },
  VM_EXITED: { statusCode: 502, status: 'vm-exited' },
  SPAWN_FAILED: { statusCode: 502, status: 'spawn-failed' },
  RESTORE_FAILED: { statusCode: 502, status: 'restore-failed' },
  GUEST_UNREACHABLE: { statusCode: 502, status: 'guest-unreachable' },
  HEADERS_TIMEOUT: { statusCode: 504, status: 'headers-timeout' },
  BODY_TIMEOUT: { statusCode: 504, status: 'body-timeout' },
  REQUEST_TIMEOUT: { statusCode: 504, status: 'request-timeout' },
  GUEST_BAD_RESPONSE: { statusCode: 502, status: 'guest-bad-response' },
  CLIENT_GONE: { statusCode: 499, status: 'client-gone' },
  CLIENT_TIMEOUT: { statusCode: 408, status: 'client-timeout' },
  BAD_REQUEST: { statusCode: 400, status: 'bad-request' },
  NOT_IMPLEMENTED: { statusCode: 501, status: 'not-implemented' },
  INTERNAL: { statusCode: 500, status: 'internal-error' },
} as const

/** Failures worth retrying later: the client is told when, with Retry-After (seconds). */
export const retryAfterSeconds: Partial<Record<FailureCode, number>> = { OVERLOADED: 1, SHUTTING_DOWN: 5 }

export type FailureCode = keyof typeof failures

export class VmcgiError extends Error {
  readonly code: FailureCode
  readonly statusCode: number
  readonly status: string

  constructor(code: FailureCode, message: string, options?: { cause?: unknown; statusCode?: number }) {
    super(message, { cause: options?.cause })
    this.name = 'VmcgiError'
    this.code = code
    this.statusCode = options?.statusCode ?? failures[code].statusCode
    this.status = failures[code].status
  }
}

/** Wraps anything thrown into a VmcgiError, keeping the original as `cause`. */
export function toVmcgiError(error: unknown): VmcgiError {
  if (error instanceof VmcgiError) return error
  const fastifyStatus = (error as { statusCode?: unknown })?.statusCode
  if (typeof fastifyStatus === 'number' && fastifyStatus >= 400 && fastifyStatus < 500) {
    // Fastify's own client errors (unparseable request, and so on) keep their status.
    return new VmcgiError('BAD_REQUEST', (error as Error).message, { cause: error, statusCode: fastifyStatus })
  }
  const message = error instanceof Error ? error.message : String(error)
  return new VmcgiError('INTERNAL', message, { cause: error })
}

/** Thrown by loadConfig; main() prints it on one line and exits with status 2. */
export class ConfigError extends Error {
  readonly field: string

  constructor(field: string, message: string) {
    super(`${field}: ${message}`)
    this.name = 'ConfigError'
    this.field = field
  }
}
