-- intents: deliver only the event types the subscriber asked for, like Discord's
-- gateway intents.
--
-- subscription context:
--   intents   the intent bits, a decimal integer (e.g. 513 = GUILDS | GUILD_MESSAGES)
-- event headers:
--   type      the event type (MESSAGE_CREATE, ...)
--
-- Event types that no intent covers (READY, USER_UPDATE, ...) always pass.

local GUILDS = 1 << 0
local GUILD_MEMBERS = 1 << 1
local GUILD_MODERATION = 1 << 2
local GUILD_VOICE_STATES = 1 << 7
local GUILD_PRESENCES = 1 << 8
local GUILD_MESSAGES = 1 << 9
local GUILD_MESSAGE_REACTIONS = 1 << 10
local GUILD_MESSAGE_TYPING = 1 << 11

local INTENT_OF = {
  GUILD_CREATE = GUILDS, GUILD_UPDATE = GUILDS, GUILD_DELETE = GUILDS,
  GUILD_ROLE_CREATE = GUILDS, GUILD_ROLE_UPDATE = GUILDS, GUILD_ROLE_DELETE = GUILDS,
  CHANNEL_CREATE = GUILDS, CHANNEL_UPDATE = GUILDS, CHANNEL_DELETE = GUILDS,
  THREAD_CREATE = GUILDS, THREAD_UPDATE = GUILDS, THREAD_DELETE = GUILDS,
  GUILD_MEMBER_ADD = GUILD_MEMBERS, GUILD_MEMBER_UPDATE = GUILD_MEMBERS, GUILD_MEMBER_REMOVE = GUILD_MEMBERS,
  GUILD_BAN_ADD = GUILD_MODERATION, GUILD_BAN_REMOVE = GUILD_MODERATION,
  VOICE_STATE_UPDATE = GUILD_VOICE_STATES,
  PRESENCE_UPDATE = GUILD_PRESENCES,
  MESSAGE_CREATE = GUILD_MESSAGES, MESSAGE_UPDATE = GUILD_MESSAGES, MESSAGE_DELETE = GUILD_MESSAGES,
  MESSAGE_DELETE_BULK = GUILD_MESSAGES,
  MESSAGE_REACTION_ADD = GUILD_MESSAGE_REACTIONS, MESSAGE_REACTION_REMOVE = GUILD_MESSAGE_REACTIONS,
  TYPING_START = GUILD_MESSAGE_TYPING,
}

return function(event, subscription)
  local needed = INTENT_OF[event.headers.type or ""]
  if needed == nil then
    return true
  end
  local intents = math.tointeger(tonumber(subscription.context.intents or "0")) or 0
  return intents & needed ~= 0
end
